"""Routing for a few tokens in one Triton kernel: `Router.forward`'s GEMV, sigmoid, bias, group-limited
top-k and gate normalisation, one program per token (or, with SPLIT_ROUTE, the GEMV spread over
`split` programs per token and a second launch that selects).

Why: in the compiled batch-1 decode step of the `bench` config, routing is the router's fp32 GEMV (two
cuBLAS kernels: a dot and a reduction) and about nine fused reductions of the counting top-k
(`dsv3/model/ranking.py`): ~11 launches and ~12 µs per MoE layer, ~86 µs of an 833 µs step (H200
profile, bench/results/decode_2026-12-01.json), for 128 KB of router weights and 32 scores per token.
One launch per layer reads the same bytes.

The maths is `Router.forward`'s (spec §1.6), in fp32:
    logits = x · W^T                        W [E, D] read in its own dtype, products and sums in fp32
    scores = sigmoid(logits);  choice = scores + bias
    group score = the sum of each group's top-2 choices (the group max without a bias)
    keep the top `topk_group` groups, the others' choices become -inf
    indices = the top K choices, best first;  gates = scores there, / their sum (+1e-20), x route scale
Every selection ranks by counting, ties to the lower index, as `ranking.py` does under compile
(`torch.topk` leaves the order of ties unspecified: eager and compiled routing agree wherever the
values are distinct).  Only the GEMV's summation order differs from the twin's.

Measured end to end (H200, bench/decode.py's `route` section, commit 53074f1, 256-column tiles): the
compiled batch-8 decode step of the `bench` config runs at 5,554 tok/s with it, 5,414 without.  Alone
(bench/route_kernel.py, commit 8874610): 7.4 us per layer at 1 token with the current tiles, against
15.1 us for the compiled Router.forward; decoding has not been timed with these tiles yet.

Taken by `moe.py` while `ROUTE_KERNEL` is set (on; bench/decode.py's `route` section flips it) and
`use_small_route` holds: CUDA, sigmoid scoring (V3), E and E/n_group powers of
two, E <= MAX_EXPERTS (the [E, E] comparison of the top-k lives in registers), at most MAX_TOKENS
rows.  Registered as a `torch.library.triton_op`, so compiled steps trace into the launch and CUDA
graphs capture it.  Twin: `Router.forward`.  Written by hand because no library fuses a router.

Two more forms for decoding's MoE layers (`moe.moe_residual_forward`):
  small_route_norm      the residual add and the FFN's RMSNorm in the GEMV's launch (each program sums its
                        token's whole row, normalises its slice, stores h and the residual), then the
                        selecting launch; on since run 11 (`forward.FFN_NORM_IN_ROUTE`, +1.5 % at batch 1)
  route_partials_norm   its first launch alone: the partial logits go to the slot-major experts, whose
                        gate/up programs select for themselves (`chosen_expert`; moe_small.SELECT_IN_EXPERTS,
                        on since run 12, +1.2 % at batch 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.layers import RMSNorm
from ..model.moe import Router
from .triton_ops import await_previous_kernel, kernel_op, launch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only torch builds ship without Triton; there Router.forward runs

    def _jit(fn):
        return fn


ROUTE_KERNEL = True  # read at trace time: set it before the first generate
MAX_EXPERTS = 64
ACC_VALUES = 32 * 1024  # the routing GEMV's accumulator budget (see _small_route_op)
MAX_TOKENS = 64  # the decode MoE's small paths end at N*K <= 16E: 64 tokens of the bench config
MAX_ROW_BLOCK = 8192  # small_route_norm: a token's row is summed in one block up to this width (V3: 7168)


@dataclass(frozen=True)
class RouteTiles:
    """Compile-time choices: columns of x per GEMV step, warps, pipeline stages.  The best of
    bench/route_kernel.py's sweep (H200, 2026-12-01, commit 8874610; bench config, per layer in a graph
    of 7 routers): 1,024 columns and 8 warps, 7.4 us at 1 token and 7.2 at 64, against 17.6 and 16.5
    with 256 columns, and 15.1 and 26.9 for the compiled Router.forward."""

    block_d: int = 1024
    warps: int = 8
    stages: int = 3  # software-pipelined weight loads (Hopper: cp.async/TMA stages of the GEMV loop)
    split: int = 1  # programs per token for the GEMV; > 1: the two-launch path (SPLIT_ROUTE)


# One program per token streams the whole [E, D] router (128 KB at the bench config): 6 us per layer in
# run 8's batch-1 profile, ~20 GB/s.  The split path gives each token `split` programs that sum a slice
# of D into fp32 partials [N, split, E]; a second launch adds them in a fixed order (deterministic,
# unlike float atomics) and selects.  bench/route_kernel.py (H200, 2026-12-02, commit 7e603ff; 7 routers
# per graph): 256 columns x 8 programs, 5.56 / 5.63 / 6.19 us at 1 / 8 / 64 tokens against 6.93 / 7.17 /
# 7.27 for the one-launch kernel; in the compiled decode step batch 1 went 1,353 -> 1,371 tok/s.
SPLIT_ROUTE = True
SPLIT_TILES = RouteTiles(block_d=256, warps=4, stages=1, split=8)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def use_small_route(gate: Router, x: Tensor) -> bool:
    """The rule (see the module docstring); x [N, D]."""
    cfg = gate.cfg
    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_TOKENS and cfg.scoring_func == "sigmoid"
            and _pow2(cfg.n_routed_experts) and _pow2(cfg.n_routed_experts // cfg.n_group)
            and cfg.n_routed_experts <= MAX_EXPERTS and gate.weight.is_contiguous())


def route(gate: Router, x: Tensor) -> tuple[Tensor, Tensor]:
    """x [N, D] -> (gates [N, K] fp32, indices [N, K] int64), as gate(x) gives them: through the kernel
    while ROUTE_KERNEL is set and the rule holds, else gate(x) itself."""
    if ROUTE_KERNEL and use_small_route(gate, x):
        return small_route(gate, x, SPLIT_TILES if SPLIT_ROUTE else RouteTiles())
    r = gate(x)
    return r.weights, r.indices


def small_route(gate: Router, x: Tensor, tiles: RouteTiles = RouteTiles()) -> tuple[Tensor, Tensor]:
    """The kernel (any device Triton runs on, the interpreter included); the rule is the caller's."""
    cfg = gate.cfg
    if not (_pow2(tiles.block_d) and _pow2(tiles.warps) and tiles.stages >= 1 and tiles.split >= 1):
        raise ValueError(f"RouteTiles: block_d and warps must be powers of two, stages and split >= 1, got {tiles}")
    bias = gate.bias if gate.bias is not None else gate.weight.new_zeros(0, dtype=torch.float32)
    return _small_route_op(x.contiguous(), gate.weight, bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                           cfg.norm_topk_prob, float(cfg.routed_scaling_factor), tiles.block_d, tiles.warps, tiles.stages,
                           tiles.split)


def small_route_norm(gate: Router, norm: RMSNorm, x: Tensor, delta: Tensor | None,
                     tiles: RouteTiles = SPLIT_TILES) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The residual add and the FFN's RMSNorm before routing, in the routing GEMV's launch: with
    r = x + delta (x without delta) and h = norm(r), returns (gates, indices) of gate(h), h and r; x,
    delta [N, D].  Two launches at any `tiles.split` (the partial GEMV with the norm, then the selection).
    The kernel (any device Triton runs on); the rule is the caller's."""
    cfg = gate.cfg
    if not (_pow2(tiles.block_d) and _pow2(tiles.warps) and tiles.stages >= 1 and tiles.split >= 1):
        raise ValueError(f"RouteTiles: block_d and warps must be powers of two, stages and split >= 1, got {tiles}")
    bias = gate.bias if gate.bias is not None else gate.weight.new_zeros(0, dtype=torch.float32)
    return _small_route_norm_op(x.contiguous(), None if delta is None else delta.contiguous(), norm.weight,
                                float(norm.eps), gate.weight, bias, cfg.n_group, cfg.topk_group,
                                cfg.num_experts_per_tok, cfg.norm_topk_prob, float(cfg.routed_scaling_factor),
                                tiles.block_d, tiles.warps, tiles.stages, tiles.split)


def route_partials_norm(gate: Router, norm: RMSNorm, x: Tensor, delta: Tensor | None,
                        tiles: RouteTiles = SPLIT_TILES) -> tuple[Tensor, Tensor, Tensor]:
    """small_route_norm's first launch alone: (the routing GEMV's partial logits [N, tiles.split, E] fp32, h,
    the residual), for a consumer that selects the experts itself (`chosen_expert`)."""
    if not (_pow2(tiles.block_d) and _pow2(tiles.warps) and tiles.stages >= 1 and tiles.split >= 1):
        raise ValueError(f"RouteTiles: block_d and warps must be powers of two, stages and split >= 1, got {tiles}")
    return _route_partials_norm_op(x.contiguous(), None if delta is None else delta.contiguous(), norm.weight,
                                   float(norm.eps), gate.weight, tiles.block_d, tiles.warps, tiles.stages, tiles.split)


@_jit
def _rank(v, n: tl.constexpr):
    """v [n] -> each entry's rank, descending, ties to the lower index: #{j : v_j > v_i or (== and j < i)}."""
    i = tl.arange(0, n)
    vi, vj = v[:, None], v[None, :]
    ahead = (vj > vi) | ((vj == vi) & (i[None, :] < i[:, None]))
    return tl.sum(ahead.to(tl.int32), axis=1)


@_jit
def _partial_logits(X, W, row, d_lo, d_hi, D, E: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """x[row, d_lo:d_hi] · W[:, d_lo:d_hi]^T -> [E] fp32.  Products accumulate elementwise, [E, BLOCK_D];
    one cross-lane reduction after the loop, so the loop body is loads and FMAs the pipeliner can overlap.
    EVEN_D: the slice is a whole number of tiles."""
    e = tl.arange(0, E)
    acc = tl.zeros([E, BLOCK_D], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            xv = tl.load(X + row * D + d).to(tl.float32)
            w = tl.load(W + e[:, None] * D + d[None, :]).to(tl.float32)
        else:
            ok = d < d_hi
            xv = tl.load(X + row * D + d, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W + e[:, None] * D + d[None, :], mask=ok[None, :], other=0.0).to(tl.float32)
        acc += w * xv[None, :]
    return tl.sum(acc, axis=1)


@_jit
def _choose(logits, BIAS, scale, E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
            K_P2: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    """Router logits [E] of one token -> (its experts [K_P2] int32, best first, and their gates [K_P2] fp32,
    normalised and scaled); entries past K are padding."""
    scale = tl.cast(scale, tl.float32)  # inductor hands a Python float in as fp64: the twin's maths is fp32
    e = tl.arange(0, E)
    scores = tl.sigmoid(logits)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(BIAS + e)
    EG: tl.constexpr = E // G
    if G > 1:
        grouped = tl.reshape(choice, [G, EG])
        pos = tl.arange(0, EG)[None, :]
        top1 = tl.max(grouped, axis=1)
        if HAS_BIAS:  # + the runner-up: the best of the rest once the first best is taken out
            first = tl.min(tl.where(grouped == top1[:, None], pos, EG), axis=1)
            group_score = top1 + tl.max(tl.where(pos == first[:, None], float("-inf"), grouped), axis=1)
        else:
            group_score = top1
        kept = _rank(group_score, G) < TOPK_GROUP  # [G]
        choice = tl.reshape(tl.where(kept[:, None], grouped, float("-inf")), [E])
    rank = _rank(choice, E)  # [E]
    r = tl.arange(0, K_P2)
    hit = rank[None, :] == r[:, None]  # [K_P2, E]: slot r holds the expert of rank r
    idx = tl.sum(tl.where(hit, e[None, :], 0), axis=1)
    gates = tl.sum(tl.where(hit, scores[None, :], 0.0), axis=1)
    if NORM:
        gates = gates / (tl.sum(tl.where(r < K, gates, 0.0), axis=0) + 1e-20)
    return idx, gates * scale


@_jit
def _select(logits, BIAS, GATES, INDICES, row, scale, E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr,
            K: tl.constexpr, K_P2: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    """Router logits [E] of one token -> its K gates and expert indices, stored at `row`."""
    idx, gates = _choose(logits, BIAS, scale, E, G, TOPK_GROUP, K, K_P2, HAS_BIAS, NORM)
    r = tl.arange(0, K_P2)
    tl.store(GATES + row * K + r, gates, mask=r < K)
    tl.store(INDICES + row * K + r, idx.to(tl.int64), mask=r < K)


@_jit
def chosen_expert(PARTS, BIAS, token, j, scale, E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  K: tl.constexpr, K_P2: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                  SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """The routing of one token from its GEMV partials PARTS [tokens, SPLIT, E] (summed in the finishing
    kernel's order) -> (the expert of its j-th slot, int64, and that slot's gate), for a consumer that
    routes for itself instead of waiting for `_route_finish_kernel` (moe_small's routed gate/up kernel)."""
    s = tl.arange(0, SPLIT_P2)
    parts = tl.load(PARTS + (token * SPLIT + s[:, None]) * E + tl.arange(0, E)[None, :], mask=s[:, None] < SPLIT,
                    other=0.0)
    idx, gates = _choose(tl.sum(parts, axis=0), BIAS, scale, E, G, TOPK_GROUP, K, K_P2, HAS_BIAS, NORM)
    r = tl.arange(0, K_P2)
    return tl.sum(tl.where(r == j, idx, 0), axis=0).to(tl.int64), tl.sum(tl.where(r == j, gates, 0.0), axis=0)


@_jit
def _route_kernel(X, W, BIAS, GATES, INDICES, D, scale,
                  E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr,
                  HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PDL: tl.constexpr):
    """One program per token: the whole GEMV, then the selection."""
    await_previous_kernel(PDL)
    row = tl.program_id(0)
    logits = _partial_logits(X, W, row, 0, D, D, E, BLOCK_D, EVEN_D)
    _select(logits, BIAS, GATES, INDICES, row, scale, E, G, TOPK_GROUP, K, K_P2, HAS_BIAS, NORM)


@_jit
def _route_partial_kernel(X, W, PARTS, D, CHUNK, E: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr,
                          EVEN_D: tl.constexpr, PDL: tl.constexpr):
    """Grid (tokens, SPLIT): the GEMV over columns [s * CHUNK, (s + 1) * CHUNK) -> PARTS[row, s, :]."""
    await_previous_kernel(PDL)
    row, s = tl.program_id(0), tl.program_id(1)
    d_lo = s * CHUNK
    logits = _partial_logits(X, W, row, d_lo, tl.minimum(d_lo + CHUNK, D), D, E, BLOCK_D, EVEN_D)
    tl.store(PARTS + (row * SPLIT + s) * E + tl.arange(0, E), logits)


@_jit
def _route_partial_norm_kernel(X, DELTA, NW, H, X_OUT, W, PARTS, D, CHUNK, eps, E: tl.constexpr, SPLIT: tl.constexpr,
                               BLOCK_D: tl.constexpr, ROW_BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr,
                               PDL: tl.constexpr):
    """Grid (tokens, SPLIT): `_route_partial_kernel` on h = rmsnorm(x + delta) * nw, which it also makes:
    every program sums the squares of its token's whole row (D values, read from L2), then normalises
    its own slice of columns, stores it into H (what the experts read) and x + delta into X_OUT (the
    residual), and multiplies it by the router.  Rounding as the model's: the add, x / rms and the
    weight's product each rounded to x's dtype."""
    await_previous_kernel(PDL)
    row, s = tl.program_id(0), tl.program_id(1)
    eps = tl.cast(eps, tl.float32)  # inductor hands a Python float in as fp64: the norm's maths is fp32
    sq = tl.zeros([ROW_BLOCK], dtype=tl.float32)
    for d0 in range(0, D, ROW_BLOCK):
        d = d0 + tl.arange(0, ROW_BLOCK)
        ok = d < D
        xv = tl.load(X + row * D + d, mask=ok, other=0.0)
        if HAS_DELTA:
            xv = (xv.to(tl.float32) + tl.load(DELTA + row * D + d, mask=ok, other=0.0).to(tl.float32)).to(xv.dtype)
        xf = xv.to(tl.float32)
        sq += xf * xf
    inv_rms = tl.rsqrt(tl.sum(sq, axis=0) / D + eps)
    d_lo = s * CHUNK
    d_hi = tl.minimum(d_lo + CHUNK, D)
    e = tl.arange(0, E)
    acc = tl.zeros([E, BLOCK_D], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = d < d_hi
        xv = tl.load(X + row * D + d, mask=ok, other=0.0)
        if HAS_DELTA:
            xv = (xv.to(tl.float32) + tl.load(DELTA + row * D + d, mask=ok, other=0.0).to(tl.float32)).to(xv.dtype)
            tl.store(X_OUT + row * D + d, xv, mask=ok)
        normed = (xv.to(tl.float32) * inv_rms).to(xv.dtype)
        h = (tl.load(NW + d, mask=ok, other=0.0).to(tl.float32) * normed.to(tl.float32)).to(xv.dtype)
        tl.store(H + row * D + d, h, mask=ok)
        w = tl.load(W + e[:, None] * D + d[None, :], mask=ok[None, :], other=0.0).to(tl.float32)
        acc += w * h.to(tl.float32)[None, :]
    tl.store(PARTS + (row * SPLIT + s) * E + e, tl.sum(acc, axis=1))


@_jit
def _route_finish_kernel(PARTS, BIAS, GATES, INDICES, scale,
                         E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
                         K_P2: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SPLIT: tl.constexpr,
                         SPLIT_P2: tl.constexpr, PDL: tl.constexpr):
    """One program per token: the partials summed in a fixed order, then the selection."""
    await_previous_kernel(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, SPLIT_P2)
    parts = tl.load(PARTS + (row * SPLIT + s[:, None]) * E + tl.arange(0, E)[None, :], mask=s[:, None] < SPLIT, other=0.0)
    _select(tl.sum(parts, axis=0), BIAS, GATES, INDICES, row, scale, E, G, TOPK_GROUP, K, K_P2, HAS_BIAS, NORM)


@kernel_op("dsv3::small_route")
def _small_route_op(x: Tensor, weight: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int, norm: bool,
                    scale: float, block_d: int, warps: int, stages: int, split: int) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    e = weight.shape[0]
    gates = torch.empty(n, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    select = dict(E=e, G=n_group, TOPK_GROUP=topk_group, K=k, K_P2=1 << (k - 1).bit_length(), HAS_BIAS=bias.numel() > 0,
                  NORM=norm)
    if not n:
        return gates, indices
    if split == 1:
        # the [E, BLOCK_D] fp32 accumulator stays within 32 K values (128 per thread at 8 warps): tiles swept at
        # E = 32 would spill at E = 64
        block_d = min(block_d, 1 << (d - 1).bit_length(), max(16, ACC_VALUES // e))
        launch(_route_kernel, n)[(n,)](
            x, weight, bias, gates, indices, d, scale, BLOCK_D=block_d, EVEN_D=d % block_d == 0, **select,
            num_warps=warps, num_stages=stages)
        return gates, indices
    chunk = -(-d // split)
    block_d = min(block_d, 1 << (chunk - 1).bit_length(), max(16, ACC_VALUES // e))
    parts = torch.empty(n, split, e, dtype=torch.float32, device=x.device)
    launch(_route_partial_kernel, n)[(n, split)](
        x, weight, parts, d, chunk, E=e, SPLIT=split, BLOCK_D=block_d, EVEN_D=chunk % block_d == 0 and d % chunk == 0,
        num_warps=warps, num_stages=stages)
    launch(_route_finish_kernel, n)[(n,)](
        parts, bias, gates, indices, scale, SPLIT=split, SPLIT_P2=1 << (split - 1).bit_length(), **select,
        num_warps=warps)
    return gates, indices


@kernel_op("dsv3::small_route_norm")
def _small_route_norm_op(x: Tensor, delta: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor,
                         n_group: int, topk_group: int, k: int, norm: bool, scale: float, block_d: int, warps: int,
                         stages: int, split: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = x.shape[0]
    gates = torch.empty(n, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    parts, h, residual = _launch_partials_norm(x, delta, norm_weight, eps, weight, block_d, warps, stages, split)
    if n:
        launch(_route_finish_kernel, n)[(n,)](
            parts, bias, gates, indices, scale, SPLIT=split, SPLIT_P2=1 << (split - 1).bit_length(), E=weight.shape[0],
            G=n_group, TOPK_GROUP=topk_group, K=k, K_P2=1 << (k - 1).bit_length(), HAS_BIAS=bias.numel() > 0, NORM=norm,
            num_warps=warps)
    return gates, indices, h, residual


@kernel_op("dsv3::route_partials_norm")
def _route_partials_norm_op(x: Tensor, delta: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor,
                            block_d: int, warps: int, stages: int, split: int) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_partials_norm(x, delta, norm_weight, eps, weight, block_d, warps, stages, split)


def _launch_partials_norm(x, delta, norm_weight, eps, weight, block_d, warps, stages, split):
    """_route_partial_norm_kernel -> (partial logits [N, split, E] fp32, h, the residual)."""
    n, d = x.shape
    e = weight.shape[0]
    parts = torch.empty(n, split, e, dtype=torch.float32, device=x.device)
    h = torch.empty_like(x)
    residual = torch.empty_like(x)
    if not n:
        return parts, h, residual
    chunk = -(-d // split)
    block_d = min(block_d, 1 << (chunk - 1).bit_length(), max(16, ACC_VALUES // e))
    launch(_route_partial_norm_kernel, n)[(n, split)](
        x, delta if delta is not None else x, norm_weight, h, residual, weight, parts, d, chunk, eps, E=e, SPLIT=split,
        BLOCK_D=block_d, ROW_BLOCK=min(1 << (d - 1).bit_length(), MAX_ROW_BLOCK), HAS_DELTA=delta is not None,
        num_warps=warps, num_stages=stages)
    if delta is None:
        residual.copy_(x)  # an op's outputs may not alias its inputs
    return parts, h, residual
