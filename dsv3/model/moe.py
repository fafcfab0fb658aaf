"""DeepSeekMoE (spec §1.6–1.8): router, routed experts two ways, the dispatcher seam, balance statistics.

Routing, per token (DeepSeek's `Gate.forward`; HF's `noaux_tc` is the same):
  1. scores = sigmoid(x W_g^T) (or softmax for V2 configs), router GEMM in fp32.
  2. choice = scores + bias; the bias only steers *selection* (aux-loss-free balancing).
  3. group-limited: group score = sum of its top-2 choice scores (group max without a bias); keep the
     top `topk_group` groups, mask the rest with -inf (HF once used 0.0, wrong for negative scores).
  4. top-k over the masked choice; gates = the *unbiased* scores there, renormalised, x route scale.
No token is ever dropped.

The routed experts have a slow and a fast form, held equal by tests:
  - "loop": for each expert, find its tokens and run its MLP (the reference);
  - "grouped": the dispatcher sorts token copies by expert, one grouped GEMM per projection runs all
    experts (`torch._grouped_mm` where it exists for the device and dtype), and the dispatcher combines.
The dispatcher is the seam expert parallelism plugs into: `LocalDispatcher` permutes within the
process; an all-to-all dispatcher has the same two methods and moves rows between ranks.  Where every
expert is in this process, the dispatcher also has `sort` (the order and counts alone), and experts
with `fuses_dispatch` set (FP8's, whose quantisers gather the rows and whose backward weights them) take
the tokens, the sort and the gates in one call, `forward_dispatched`, that also combines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .dtypes import keep_dtypes
from .layers import MLP, no_autocast
from .ranking import stable_argsort, topk_indices


@dataclass
class Routing:
    weights: torch.Tensor  # [N, K] fp32 gates (normalised, x route scale)
    indices: torch.Tensor  # [N, K] int64 expert ids
    scores: torch.Tensor  # [N, E] fp32 unbiased affinities (for the balance loss)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # FP32 buffer, no gradient: updated by the trainer's bias rule, stored as e_score_correction_bias.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if cfg.use_expert_bias else None)

    def _apply(self, fn, recurse=True):
        # the balancing bias stays fp32 when the module is cast (model.to(bfloat16)): updates of 1e-3 vanish in bf16
        return keep_dtypes(self, {"bias": torch.float32}, super()._apply, fn, recurse)

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.cfg
        with no_autocast(x):  # the gating GEMM stays fp32 (spec §3.1) inside a training step's bf16 autocast
            logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias
        if cfg.n_group > 1:
            grouped = choice.unflatten(-1, (cfg.n_group, -1))  # [N, G, E/G]
            group_scores = grouped.amax(-1) if self.bias is None else grouped.gather(-1, topk_indices(grouped, 2)).sum(-1)
            kept = topk_indices(group_scores, cfg.topk_group)  # [N, topk_group]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = topk_indices(choice, cfg.num_experts_per_tok)
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * cfg.routed_scaling_factor, indices, scores)


def _has_grouped_mm(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.dtype != torch.bfloat16 and (x.device.type != "cpu" or torch.compiler.is_compiling()):
        return False  # CUDA kernels, and the compiled op on any device, take BF16 only
    return x.device.type in ("cpu", "cuda")


def count_per_expert(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, [E] int64.  scatter_add has a fixed output size; bincount's
    depends on the data and so costs a host sync (and a graph break under compile) on CUDA."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] rows each, in order) times w[e]^T.
    x [M, K], w [E, N, K] -> [M, N].  Falls back to a loop over segments where no kernel exists."""
    # autocast does not cover _grouped_mm: under it, cast like the matmuls it does cover (fp32 master
    # weights x bf16 activations would otherwise mix dtypes)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, w = x.to(dtype), w.to(dtype)
    if _has_grouped_mm(x):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    parts = x.split(counts.tolist())  # host sync: fallback only
    return torch.cat([p @ w[e].T for e, p in enumerate(parts)])


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """SwiGLU of every expert on its rows: x [M, D] sorted by expert (counts [E'] rows each),
    w13 [E', 2I, D], w2 [E', D, I] -> [M, D].  Expert parallelism calls it on a rank's shard."""
    gate, up = grouped_mm(x, w13, counts).chunk(2, dim=-1)
    return grouped_mm(F.silu(gate) * up, w2, counts)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[q]] = q: where each token-major copy sits in expert order."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def sum_copies(t: torch.Tensor, k: int) -> torch.Tensor:
    """t [N*K, D] token-major -> [N, D], each token's k copies summed in fp32.  Compiled, it is written
    as k adds: inductor then emits one pointwise kernel with coalesced loads, where a reduction over
    the strided middle dim ran at ~0.9 TB/s on an H200."""
    t3 = t.unflatten(0, (-1, k))
    if not torch.compiler.is_compiling():
        return t3.sum(1)
    acc = t3[:, 0].float()
    for j in range(1, k):
        acc = acc + t3[:, j]
    return acc.to(t.dtype)


def weighted_sum(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y [N, K, D] (each token's k expert outputs), w [N, K] -> [N, D] = sum_j w[:, j] y[:, j] in fp32, y's
    dtype out.  Written as k adds, which inductor fuses into one pointwise kernel (as sum_copies)."""
    acc = y[:, 0].float() * w[:, 0:1]
    for j in range(1, y.shape[1]):
        acc = acc + y[:, j].float() * w[:, j : j + 1]
    return acc.to(y.dtype)


def weighted_sum_of_copies(y: torch.Tensor, w: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """weighted_sum of y [N*K, D] in expert order, gathered to token order by inv = inverse_permutation(order).
    The gather is fused into the sum when compiled (not written)."""
    return weighted_sum(y.index_select(0, inv).unflatten(0, (-1, w.shape[1])), w)


class Experts(nn.Module):
    """All routed experts' SwiGLU weights, stacked: w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I]."""

    fuses_dispatch = False  # see the module docstring; FP8Experts sets it

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter))

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] -> [M, D]."""
        return expert_ffn(x, self.w13, self.w2, counts)

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[e])


class LocalDispatcher:
    """Groups token copies by expert inside one process.  No host synchronisation."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def sort(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices [N, K] -> the stable sort of the N*K token copies by expert (order [N*K]), counts [E]."""
        flat = indices.flatten()
        return stable_argsort(flat), count_per_expert(flat, self.n_experts)

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D], indices [N, K] -> rows [N*K, D] sorted by expert, counts [E], the sort order."""
        order, counts = self.sort(indices)
        return x[order // indices.shape[1]], counts, order

    def combine(self, y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """y [N*K, D] in dispatch order, weights [N, K] -> [N, D] = sum_k w_k y_k (deterministic, no atomics)."""
        n, k = weights.shape
        unsorted = torch.empty_like(y).index_copy_(0, order, y).view(n, k, -1)  # [N, K, D]
        return torch.bmm(weights.unsqueeze(1).to(y.dtype), unsorted).squeeze(1)


@dataclass
class MoEStats:
    load: torch.Tensor  # [E] tokens routed to each expert in this forward (int64, detached)
    balance_loss: torch.Tensor  # scalar, alpha * sum_i f_i P_i averaged over sequences (0 outside training)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, experts_impl: str = "grouped"):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared = MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
        self.dispatcher = LocalDispatcher(cfg.n_routed_experts)
        self.set_experts_impl(experts_impl)

    def set_experts_impl(self, name: str) -> None:
        if name not in ("grouped", "loop"):
            raise ValueError(f"unknown experts implementation {name!r}; choose 'grouped' or 'loop'")
        self.experts_impl = name

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        r = self.gate(flat)
        if self.experts_impl == "loop":
            routed = self._loop(flat, r)
        elif getattr(self.experts, "fuses_dispatch", False) and hasattr(self.dispatcher, "sort"):
            order, counts = self.dispatcher.sort(r.indices)
            routed = self.experts.forward_dispatched(flat, r.weights, order, counts)
        else:
            rows, counts, order = self.dispatcher.dispatch(flat, r.indices)
            routed = self.dispatcher.combine(self.experts.forward_grouped(rows, counts), r.weights, order)
        out = routed.view(b, t, d)
        if self.shared is not None:
            out = out + self.shared(x)
        load = count_per_expert(r.indices, self.cfg.n_routed_experts).detach()
        return out, MoEStats(load, self._balance_loss(r, b, t))

    def _loop(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.cfg.n_routed_experts):
            token, slot = torch.where(r.indices == e)
            if token.numel():
                y = self.experts.forward_one(e, x[token]) * r.weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out

    def _balance_loss(self, r: Routing, b: int, t: int) -> torch.Tensor:
        """Complementary sequence-wise balance loss (report eq. 17-20), per sequence then averaged.  f counts
        the experts routed to (the biased, group-limited top-k), not eq. 17's unbiased TopK(s): a choice
        where the report is UNCONFIRMED (see `ModelConfig.seq_aux_alpha`)."""
        cfg = self.cfg
        if not (self.training and cfg.seq_aux_alpha > 0):
            return r.scores.new_zeros(())
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        norm_scores = r.scores / r.scores.sum(-1, keepdim=True)  # s' normalised over all experts
        p = norm_scores.view(b, t, e).mean(1)  # [B, E]
        hits = torch.zeros(b, e, device=p.device).scatter_add_(1, r.indices.view(b, t * k), torch.ones(b, t * k, device=p.device))
        f = hits * (e / (k * t))  # a constant: gradient flows through P only
        return cfg.seq_aux_alpha * (f * p).sum(-1).mean()
