"""Training fast paths, switched on from outside the model (design principle 2).

`apply_fast_paths(model)` moves a built `Transformer` onto its fast forms in place, without touching its
parameters or `state_dict` keys:

- the attention core, by name from `ATTENTION_IMPLS`.  This module registers four for MLA's unequal
  head dims (qk 192 / v 128):
    "cudnn"      SDPA pinned to its cuDNN backend (takes unequal dims; torch 2.11's own SDPA choice on Hopper);
    "efficient"  SDPA pinned to its memory-efficient backend: slower, but its backward is deterministic under
                 `torch.use_deterministic_algorithms` (cuDNN's is not);
    "flex"       FlexAttention with a causal block mask (compiled when called eagerly);
    "flash_pad"  v zero-padded to qk's width so SDPA's flash backend takes it, output sliced back.
  On a CPU each falls back to what runs there with the same maths, so CPU tests can hold them equal.
- the routed experts on the grouped-GEMM path, with `SortedDispatcher` plugged into the dispatcher
  seam: expert counts with no host sync (searchsorted over the sorted ids, not `bincount`), a
  permutation whose backward is a gather plus a sum over the k copies (no sorted/atomic index_put),
  and, compiled, a combine that gathers inside the weighted sum instead of scattering a copy and
  running a batched [1 x k] GEMM.
- `torch.compile` per block (all MoE blocks share one graph), on the final norm and each MTP module.
  (The objective, `dsv3.train.losses.training_loss`, compiles its cross-entropy on CUDA by itself.)

The slow twins stay in the model (eager attention, loop experts, `LocalDispatcher`), and
tests/test_perf.py holds them equal.  Not here: parallelism (dsv3.distributed), FP8, recomputation.
No function here synchronises with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model.attention import ATTENTION_IMPLS, eager_attention, sdpa_attention
from .model.moe import MoE, inverse_permutation, sum_copies, weighted_sum_of_copies

# ----------------------------------------------------------------------------------------- attention


def _sdpa_on(backend, q, k, v, scale):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on its cuDNN backend: the fastest causal kernel for qk 192 / v 128 on Hopper (torch-kernels.md).
    cuDNN attention takes only fp16/bf16: fp32 (e.g. `--precision fp32 --compile`) and CPUs use plain SDPA."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention(q, k, v, scale)
    from torch.nn.attention import SDPBackend

    return _sdpa_on(SDPBackend.CUDNN_ATTENTION, q, k, v, scale)


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on its memory-efficient backend, for runs that must repeat bit for bit (deterministic backward)."""
    if q.device.type != "cuda":
        return sdpa_attention(q, k, v, scale)
    from torch.nn.attention import SDPBackend

    return _sdpa_on(SDPBackend.EFFICIENT_ATTENTION, q, k, v, scale)


def flash_pad_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """v [.., Dv] zero-padded to Dqk so the flash backend (equal dims only) runs; zeros add nothing."""
    dv = v.shape[-1]
    vp = F.pad(v, (0, q.shape[-1] - dv))
    if q.device.type != "cuda":
        return sdpa_attention(q, k, vp, scale)[..., :dv]
    from torch.nn.attention import SDPBackend

    return _sdpa_on(SDPBackend.FLASH_ATTENTION, q, k, vp, scale)[..., :dv]


_BLOCK_MASKS: dict = {}
_FLEX_COMPILED = None


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """FlexAttention with a causal block mask (cached per length and device).  Off CUDA with gradients it
    runs `eager_attention` instead: FlexAttention has no CPU backward."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if q.device.type != "cuda" and torch.is_grad_enabled() and q.requires_grad:
        return eager_attention(q, k, v, scale)

    t = q.shape[-2]
    key = (t, str(q.device))
    mask = _BLOCK_MASKS.get(key)
    if mask is None:
        mask = create_block_mask(_causal, None, None, t, t, device=q.device)
        if not torch.compiler.is_compiling():
            _BLOCK_MASKS[key] = mask
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        fn = flex_attention  # inside a compiled block it is traced; on a CPU, eager runs the reference maths
    else:
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention)
        fn = _FLEX_COMPILED
    return fn(q, k, v, block_mask=mask, scale=scale)


ATTENTION_IMPLS.setdefault("cudnn", cudnn_attention)
ATTENTION_IMPLS.setdefault("efficient", efficient_attention)
ATTENTION_IMPLS.setdefault("flex", flex_causal_attention)
ATTENTION_IMPLS.setdefault("flash_pad", flash_pad_attention)


# ----------------------------------------------------------------------------------------- dispatch


class _Dispatch(torch.autograd.Function):
    """rows[q] = x[order[q] // k]: every token copied k times, in expert order.  Autograd's own backward
    of that gather is an accumulating index_put (sort-based on CUDA); as `order` is a permutation, the
    gradient is a gather back to token-major order and a sum over the k copies (fused when compiled)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return sum_copies(grad.index_select(0, inverse_permutation(order)), ctx.k), None, None


class _Combine(torch.autograd.Function):
    """out[n] = sum_j w[n, j] y[inv[n k + j]] in fp32, y in expert order: a gather fused into the weighted
    sum (no scattered [N, K, D] copy, no batched [1 x k] GEMM); backward is two fused gathers."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, w: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        inv = inverse_permutation(order)
        ctx.save_for_backward(y, w, order, inv)
        return weighted_sum_of_copies(y, w, inv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, w, order, inv = ctx.saved_tensors
        k = w.shape[1]
        # d y[q] = grad[token of q] * w[that token, that slot], with order[q] = token * k + slot
        gy = grad.index_select(0, order // k).float() * w.flatten().index_select(0, order).unsqueeze(-1)
        gw = (grad.unsqueeze(1).float() * y.index_select(0, inv).unflatten(0, (-1, k)).float()).sum(-1)  # [N, K]
        return gy.to(y.dtype), gw.to(w.dtype), None


class SortedDispatcher:
    """`LocalDispatcher`'s contract (dispatch -> rows, counts, order; combine) with no host sync, and a
    permutation / combine whose backward passes are gathers (see `_Dispatch`, `_Combine`).  Eager
    (uncompiled) combine keeps LocalDispatcher's batched GEMM, the faster form without fusion."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def sort(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices [N, K] -> order [N*K] (stable sort of the token copies by expert), counts [E] (int64)."""
        sorted_ids, order = indices.flatten().sort(stable=True)
        # counts from the sorted ids: bincount's output size depends on the data (a host sync, and a
        # graph break under torch.compile); searchsorted over E boundaries has a fixed size.
        bounds = torch.arange(1, self.n_experts + 1, device=indices.device, dtype=sorted_ids.dtype)
        ends = torch.searchsorted(sorted_ids, bounds)  # [E]: how many copies go to experts <= e
        return order, torch.diff(ends, prepend=ends.new_zeros(1))

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D], indices [N, K] -> rows [N*K, D] sorted by expert, counts [E] (int64), the sort order."""
        order, counts = self.sort(indices)
        return _Dispatch.apply(x, order, indices.shape[1]), counts, order

    def combine(self, y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """y [N*K, D] in dispatch order, weights [N, K] fp32 -> [N, D] = sum_k w_k y_k."""
        if torch.compiler.is_compiling():
            return _Combine.apply(y, weights, order)
        n, k = weights.shape
        unsorted = torch.empty_like(y).index_copy_(0, order, y).view(n, k, -1)  # [N, K, D]
        return torch.bmm(weights.unsqueeze(1).to(y.dtype), unsorted).squeeze(1)


# ----------------------------------------------------------------------------------------- the switch


def apply_fast_paths(
    model: nn.Module,
    *,
    attention: str | None = "cudnn",
    experts: str | None = "grouped",
    dispatcher: bool = True,
    compile: bool = True,
    compile_mtp: bool = True,
    backend: str = "inductor",
    mode: str | None = None,
) -> nn.Module:
    """Switches `model` (a `dsv3.Transformer`) to its fast paths in place and returns it.

    attention: a name in ATTENTION_IMPLS ("cudnn", "efficient", "flex", "flash_pad", "sdpa", "eager") or None to keep.
    experts: "grouped" | "loop" | None.  dispatcher: plug `SortedDispatcher` into every MoE.
    compile: `Module.compile` on each block, the final norm and (compile_mtp) each MTP module; the
    modules stay the same objects, so `state_dict` keys and optimiser parameter lists are unchanged.
    """
    model.set_impl(attn=attention, experts=experts)
    if dispatcher:
        for m in model.modules():
            if isinstance(m, MoE):
                m.dispatcher = SortedDispatcher(m.cfg.n_routed_experts)
    if compile:
        import torch._dynamo

        # every block shares one code object: allow a few shape/graph variants before falling back
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in model.layers:
            block.compile(backend=backend, mode=mode)
        model.norm.compile(backend=backend, mode=mode)
        if compile_mtp:
            for mtp in model.mtp:
                mtp.compile(backend=backend, mode=mode)
    return model
