"""The MoE layer for generation: the model's router, dispatcher and experts, without training statistics.

`MoE.forward` also returns what only training needs (per-expert load for the bias update, the
sequence-wise balance loss in train mode); generation skips those kernels.  Routing, dispatch (the
expert-parallel seam) and the grouped expert GEMMs are the model's own calls, with no host sync where
grouped GEMMs exist (CPU; CUDA BF16), so a decode step stays capturable in a CUDA graph.
`tests/test_inference.py` holds this equal to `MoE.forward`.

A few tokens (N*K <= E, CUDA, BF16: `moe_small.use_small_batch`) skip the dispatcher: two Triton
kernels read each chosen expert's weights by index (`moe_small.small_batch_experts`).  The grouped
path spent ~6 kernels at batch 1 (sort, copies, two cutlass grouped GEMMs at ~26 us each, SwiGLU,
combine) on a weight read that needs ~25 us in all.  A shared expert of one expert's size rides along
in the same kernels (`fusable_shared`).  With `moe_small.EXPERT_MAJOR` set (the default),
larger batches (N*K <= 16E) take the expert-major kernels, which read each touched expert once.  Only
plain `Experts` take these; an FP8 checkpoint's `FP8InferenceExperts` take moe_small_fp8.py's slot-major
pair under the same N*K <= E rule while `moe_small_fp8.FP8_SMALL_EXPERTS` is set (on since H200 run 26), and
expert-parallel experts keep the grouped path.  Routing goes
through `route_small.route`: Triton launches for few tokens while `ROUTE_KERNEL` is set (a split GEMV
and a selecting launch with `SPLIT_ROUTE`, else one), else the model's router.  `moe_residual_forward` also takes the residual add and the FFN norm before
the layer, which that launch can do too (`forward.FFN_NORM_IN_ROUTE`); with `moe_small.SELECT_IN_EXPERTS`
the slot-major experts then select from its partial logits themselves (one routing launch, not two).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.layers import RMSNorm
from ..model.moe import Experts, MoE
from .gemv import paired_linear
from ..fp8.inference import FP8InferenceExperts
from . import moe_small, moe_small_fp8, route_small
from .moe_small import (
    expert_major_experts,
    small_batch_experts,
    small_batch_experts_routed,
    use_expert_major,
    use_small_batch,
)
from .route_small import route, route_partials_norm, small_route_norm, use_small_route


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] (the FFN norm's output) -> [B, T, D]."""
    flat = x.reshape(-1, x.shape[-1])
    gates, indices = route(moe.gate, flat)
    return _experts(moe, x, gates, indices)


def moe_residual_forward(moe: MoE, norm: RMSNorm, x: torch.Tensor, delta: torch.Tensor | None,
                         fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add, the FFN norm and the MoE: with r = x + delta (x without delta), returns
    (r, moe(norm(r))), all [B, T, D].  With `fused` and the routing kernel's rule, the add and the norm
    run inside the routing launch (`route_small.small_route_norm`), which hands the experts h; else as
    torch ops (the twin)."""
    b, t, d = x.shape
    if fused and delta is not None and route_small.ROUTE_KERNEL and use_norm_route(moe.gate, norm, x, delta):
        # SPLIT_ROUTE off: one program per token for the GEMV, still with its selecting launch
        tiles = route_small.SPLIT_TILES if route_small.SPLIT_ROUTE else route_small.RouteTiles()
        flat, flat_delta = x.reshape(-1, d), delta.reshape(-1, d)
        k, e = moe.cfg.num_experts_per_tok, moe.cfg.n_routed_experts
        if moe_small.SELECT_IN_EXPERTS and type(moe.experts) is Experts and use_small_batch(flat.shape[0], k, e, x):
            # the slot-major gate/up kernel selects each slot's expert from the GEMV's partials
            parts, h, r = route_partials_norm(moe.gate, norm, flat, flat_delta, tiles)
            shared = fusable_shared(moe)
            out = small_batch_experts_routed(h, parts, moe.gate, moe.experts.w13, moe.experts.w2, shared=shared)
            out = out.view(b, t, d)
            if shared is None and moe.shared is not None:
                out = out + shared_expert(moe, h.view(b, t, d))
            return r.view(b, t, d), out
        gates, indices, h, r = small_route_norm(moe.gate, norm, flat, flat_delta, tiles)
        return r.view(b, t, d), _experts(moe, h.view(b, t, d), gates, indices)
    r = x if delta is None else x + delta
    return r, moe_forward(moe, norm(r))


def use_norm_route(gate, norm: RMSNorm, x: torch.Tensor, delta: torch.Tensor) -> bool:
    """`small_route_norm`'s rule: the routing kernel's (use_small_route, on x's rows), delta of x's shape and
    the norm's weight and delta in x's dtype (the kernel rounds the residual and h to it, as torch's add
    and RMSNorm do when all three share it)."""
    return (use_small_route(gate, x.reshape(-1, x.shape[-1])) and norm.weight.dtype == delta.dtype == x.dtype
            and delta.shape == x.shape)


def _experts(moe: MoE, x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The routed and shared experts on x [B, T, D] (normed), given its routing ([N, K] each)."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    n, k = indices.shape
    # plain experts hold all E experts here; FP8 and expert-parallel (sharded) experts are other classes
    plain, e = type(moe.experts) is Experts, moe.cfg.n_routed_experts
    if plain and (use_small_batch(n, k, e, x) or (moe_small.EXPERT_MAJOR and use_expert_major(n, k, e, x))):
        kernels = small_batch_experts if use_small_batch(n, k, e, x) else expert_major_experts
        fused = fusable_shared(moe)
        out = kernels(flat, indices, gates, moe.experts.w13, moe.experts.w2, shared=fused).view(b, t, d)
        return out if fused is not None or moe.shared is None else out + shared_expert(moe, x)
    if type(moe.experts) is FP8InferenceExperts and moe_small_fp8.use_small_batch_fp8(n, k, e, x):
        fused = moe_small_fp8.fusable_shared_fp8(moe.shared, moe.experts)  # the shared expert as one more slot
        out = moe_small_fp8.small_batch_experts_fp8(flat, indices, gates, moe.experts, moe_small_fp8.decode_tiles(),
                                                    shared=fused).view(b, t, d)
        return out if fused is not None or moe.shared is None else out + shared_expert(moe, x)
    rows, counts, order = moe.dispatcher.dispatch(flat, indices)  # token copies sorted by expert
    out = moe.dispatcher.combine(moe.experts.forward_grouped(rows, counts), gates, order).view(b, t, d)
    return out if moe.shared is None else out + shared_expert(moe, x)


def shared_expert(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The shared expert's MLP on x [B, T, D], its w1 and w3 in one GEMV launch while the kernel takes them."""
    return moe.shared(x, linear=paired_linear(moe.shared.w1, moe.shared.w3, x))


def fusable_shared(moe: MoE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The shared expert's (w1, w3, w2) when the small-batch kernels can run it as one more slot: plain
    Linear weights (not FP8) of one routed expert's shapes, in the experts' dtype."""
    mlp = moe.shared
    if mlp is None or not all(type(lin) is nn.Linear for lin in (mlp.w1, mlp.w3, mlp.w2)):
        return None
    ws = (mlp.w1.weight, mlp.w3.weight, mlp.w2.weight)
    w2 = moe.experts.w2
    shapes_ok = ws[0].shape == ws[1].shape == w2.shape[1:][::-1] and ws[2].shape == w2.shape[1:]
    return ws if shapes_ok and all(w.is_contiguous() and w.dtype == w2.dtype for w in ws) else None
