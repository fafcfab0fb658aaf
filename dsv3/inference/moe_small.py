"""Routed experts for a few tokens, in two Triton variants that read expert weights in place (no weight
copies, no host sync), each an op that torch.compile traces and a CUDA graph captures.

Slot-major (`small_batch_experts`, moe_forward's path for N*K <= E): each (token, expert) slot reads its
expert's weights by index.  At decode batch 1-4 the routed experts are matrix-vector products bound by
the weight bytes read; the grouped path (dispatcher sort, two `torch._grouped_mm`, SwiGLU, combine)
spends ~6 kernels on it; here two kernels read only the chosen experts' rows, with no sort:

  gate/up   program (slot, I tile): BLOCK_I gate rows and BLOCK_I up rows of expert e = indices[slot]
            against the slot's token x [D]  ->  h[slot] = silu(gate) * up, [N*K, I] fp32.
  down      rows of w2[e] against h[slot], times the slot's gate, summed over the token's K slots in a
            fixed order (no atomics, so deterministic and CUDA-graph replays are bit-equal):
              "loop_k"    program (token, D tile) loops over its K slots and writes out [N, D];
              "partials"  program (slot, D tile) writes an fp32 partial [N*K, D]; torch sums over K.

Two slots on one expert read it twice, so the slot-major read grows with N*K while the weights do not.
`small_batch_experts_routed` is the same pair of kernels whose gate/up programs first pick their slot's
expert from the routing GEMV's partial logits (route_small.chosen_expert), so no selecting launch runs
between routing and the experts (behind SELECT_IN_EXPERTS, on since timed on the H200).

Expert-major (`expert_major_experts`, for N*K past E; on no path until the GPU measures it): slots are
grouped by expert with a counting sort in torch (counts, cumsum, a stable argsort of the expert ids; no
host sync, no data-dependent shapes), and each program reads one tile of one expert's weights once and
applies it to all of that expert's rows with `tl.dot`:

  gate/up   program (row block, expert, I tile): [BLOCK_I gate + BLOCK_I up rows, D] against BLOCK_M of
            the expert's rows of x  ->  h = silu(gate) * up, [slots, I] in the weights' dtype (bf16, as
            the grouped path's h; fp32 accumulation), in group (sorted) order.
  down      program (row block, expert, D tile): [BLOCK_D_OUT rows of w2[e], I] against those rows' h,
            times each row's gate -> fp32 partials [slots, D] at each row's slot index; torch sums each
            token's partials in a fixed order (deterministic, as above).
An expert's row blocks (more than one past BLOCK_M rows) are adjacent programs that share each weight
tile through L2; experts without rows cost a launch slot and no weight bytes.

A shared expert of one routed expert's size (DeepSeek-V3's: one, of moe_intermediate_size) can ride
along in either variant as one more slot per token with gate 1 (`shared=`; expert id E in the
expert-major grouping): at batch 1 its three GEMVs and the add were four more launches per layer for
12 MB.

The slot-major h is fp32: at most N*K*I*4 bytes (32 KB at batch 1 of the bench config, against 100 MB
of weights), so it costs nothing, and the only roundings left are the bf16 inputs and the output; the
expert-major h is rounded once more, as the grouped path's is.  Tiles are arguments (`Tiles`,
`ExpertMajorTiles`), swept by bench/moe_small_kernel.py; they are not autotuned (compile time).

Both ops are `torch.library.triton_op`s, so `torch.compile(fullgraph=True)` traces into the launches
without a graph break and the captured decode step replays them.  Their twin
`small_batch_experts_reference` gathers the chosen experts' weights and does the maths in fp32 in torch
(CPU and tests).  Not here: FP8 weights, and the rule's other half (plain local experts), which
`moe.py` checks.  Written by hand because no library offers an index-gathered MoE GEMV, and the grouped
GEMMs are tuned for many rows per expert, not a handful.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.ranking import stable_argsort
from .route_small import chosen_expert
from .triton_ops import await_previous_kernel, kernel_op, launch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only torch builds ship without Triton; there only the twin runs

    def _jit(fn):
        return fn


def use_small_batch(n_tokens: int, k: int, n_experts: int, x: Tensor) -> bool:
    """The decode path's rule.  The kernels exist for CUDA and are tuned for BF16.  Each slot reads
    its expert's whole weights (two tokens that pick one expert read it twice, hopefully from L2),
    so N*K slots read N*K expert matrices; the grouped path reads each touched expert once, at most
    E.  With N*K <= E the small path never reads more than the grouped path's worst case, and at
    batch 1 (K distinct experts) it reads exactly what the grouped path reads."""
    return x.is_cuda and x.dtype == torch.bfloat16 and n_tokens * k <= n_experts


# The decode MoE takes the expert-major kernels past use_small_batch's range while this is set (bench/decode.py's
# expert_major section times a decode with it off).  Read at trace time: set it before the first generate.
EXPERT_MAJOR = True
EXPERT_MAJOR_MAX_SLOTS_PER_EXPERT = 16  # N*K <= this * E: the largest batch measured faster than the grouped path
# With the FFN norm in the routing launch (forward.FFN_NORM_IN_ROUTE), the slot-major gate/up kernel picks each
# slot's expert from the routing GEMV's partial logits itself (`small_batch_experts_routed`), so routing's
# selecting launch goes: 7 launches fewer per batch-1 step of the bench config, where each took ~1.8 us plus
# a ~0.6 us gap (run 11's profile), against ~0.3 us more before each gate/up program streams its weights.
# H200, bench/decode.py's `select` section in one job (a2b2bf7, 2026-12-02, run 12): batch 1 1,520.5 tok/s
# with it against 1,502.5 without (+1.2 %; the job's noise is ~0.5 %).  Batch 8 does not take it (N*K > E).
# Read at trace time.
SELECT_IN_EXPERTS = True


def use_expert_major(n_tokens: int, k: int, n_experts: int, x: Tensor) -> bool:
    """The rule for the expert-major kernels: CUDA, BF16 (the tuned dtype), N*K <= 16*E.  On an H200 at the
    bench shapes (bench/moe_small_kernel.py, commit 20e5f04, compiled, per layer) they took 101 / 109 / 120 us
    at N = 8 / 32 / 64 (N*K = 2E / 8E / 16E) against 173 / 176 / 182 us for the compiled grouped path
    (dispatch + two _grouped_mm + combine), and 126 us for the slot-major kernels at N = 8.  Each expert's
    rows are padded to BLOCK_M (16) for tl.dot; an expert with more rows takes more row blocks that share
    its weight tiles through L2.  Past 16E (batch 256: 64E) the grouped GEMMs' large tiles are unmeasured
    against it, so they keep those batches."""
    return (x.is_cuda and x.dtype == torch.bfloat16
            and n_tokens * k <= EXPERT_MAJOR_MAX_SLOTS_PER_EXPERT * n_experts)


@dataclass(frozen=True)
class Tiles:
    """Compile-time choices of the two slot-major kernels.  Defaults: the fastest of bench/moe_small_kernel.py's
    sweep on an H200 at the bench shapes (commit 7a333d8, bench/results/moe_small_kernel_2026-12-01_run1.json):
    30.9 us per layer at batch 1 (3.3 TB/s of expert weights), against 34.1 us for the first guesses
    (down "partials", 16 x 256) and 73 us for the compiled grouped path."""

    up_block_i: int = 16  # gate rows (and as many up rows) per program
    up_block_d: int = 256  # columns of x per loop step
    up_warps: int = 4
    up_stages: int = 3
    down: str = "loop_k"  # or "partials" (see the module docstring)
    down_block_d: int = 4  # output columns per program
    down_block_i: int = 512  # columns of h per loop step
    down_warps: int = 4
    down_stages: int = 3


@dataclass(frozen=True)
class ExpertMajorTiles:
    """Compile-time choices of the expert-major kernels.  Defaults: the fastest of bench/moe_small_kernel.py's
    sweep on an H200 at the bench shapes (commit 20e5f04, bench/results/moe_small_kernel_2026-12-01.json):
    BLOCK_M 16 (tl.dot's least size; padding FLOPs are free in a kernel bound by weight bytes), 64 gate rows
    x 128 columns per gate/up step, 64 output columns x 128 columns of h per down step.  The first guesses
    (16-row weight tiles x 256 columns) took 147 us per layer at N = 8 against 120 us for these, uncompiled."""

    block_m: int = 16  # rows (slots) of one expert per tl.dot, in both kernels; at least 16
    block_i: int = 64  # gate/up: gate rows (and as many up rows) per program; at least 16
    block_d: int = 128  # gate/up: columns of x per loop step
    up_warps: int = 4
    up_stages: int = 3
    block_d_out: int = 64  # down: rows of w2[e] (output columns) per program; at least 16
    block_i_in: int = 128  # down: columns of h per loop step
    down_warps: int = 4
    down_stages: int = 3


def small_batch_experts(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                        tiles: Tiles = Tiles(), shared: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """x [N, D], indices [N, K] int64, weights [N, K] (gates, normalised and scaled), w13 [E, 2I, D]
    (gate rows, then up rows), w2 [E, D, I] -> [N, D] in x's dtype, fp32 accumulation.
    shared: a shared expert of the same size, (w1 [I, D], w3 [I, D], w2 [D, I]), rides along as one
    more slot per token with gate 1 (its three GEMVs and the add cost launches, not bytes, at batch 1)."""
    if tiles.down not in ("partials", "loop_k"):
        raise ValueError(f"unknown down-projection variant {tiles.down!r}; choose 'partials' or 'loop_k'")
    assert w13.is_contiguous() and w2.is_contiguous(), "the kernels address expert weights by flat offsets"
    ws1, ws3, ws2 = _checked_shared(shared, w13, w2)
    t = tiles  # spelt out field by field: torch.compile traces attribute reads, not dataclasses.astuple
    return _small_batch_experts_op(x.contiguous(), indices.long().contiguous(), weights.float().contiguous(), w13, w2,
                                   ws1, ws3, ws2,
                                   t.up_block_i, t.up_block_d, t.up_warps, t.up_stages, t.down,
                                   t.down_block_d, t.down_block_i, t.down_warps, t.down_stages)


def small_batch_experts_routed(x: Tensor, parts: Tensor, gate, w13: Tensor, w2: Tensor, tiles: Tiles = Tiles(),
                               shared: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """small_batch_experts with the routing's selection in its gate/up launch: x [N, D] (the normed tokens),
    parts [N, SPLIT, E] fp32 (`route_small.route_partials_norm`'s partial router logits), `gate` the Router
    whose bias and selection rules (groups, K, normalisation, scale) apply -> [N, D].  Each routed slot's
    gate/up program sums its token's partials in the selecting kernel's order and picks its expert
    (`route_small.chosen_expert`), so routing needs one launch, not two."""
    if tiles.down not in ("partials", "loop_k"):
        raise ValueError(f"unknown down-projection variant {tiles.down!r}; choose 'partials' or 'loop_k'")
    assert w13.is_contiguous() and w2.is_contiguous(), "the kernels address expert weights by flat offsets"
    ws1, ws3, ws2 = _checked_shared(shared, w13, w2)
    cfg = gate.cfg
    bias = gate.bias if gate.bias is not None else gate.weight.new_zeros(0, dtype=torch.float32)
    t = tiles
    return _small_batch_experts_routed_op(x.contiguous(), parts.contiguous(), bias, cfg.n_group, cfg.topk_group,
                                          cfg.num_experts_per_tok, cfg.norm_topk_prob, float(cfg.routed_scaling_factor),
                                          w13, w2, ws1, ws3, ws2, t.up_block_i, t.up_block_d, t.up_warps, t.up_stages,
                                          t.down, t.down_block_d, t.down_block_i, t.down_warps, t.down_stages)


def expert_major_experts(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                         shared: tuple[Tensor, Tensor, Tensor] | None = None,
                         tiles: ExpertMajorTiles = ExpertMajorTiles()) -> Tensor:
    """small_batch_experts' contract (x [N, D], indices [N, K], weights [N, K], w13 [E, 2I, D], w2 [E, D, I],
    shared (w1, w3, w2) of one expert's size -> [N, D] in x's dtype), with each touched expert's weights
    read once for all its rows.  x and the weights share a dtype (tl.dot takes equal operand types)."""
    assert w13.is_contiguous() and w2.is_contiguous(), "the kernels address expert weights by flat offsets"
    assert x.dtype == w13.dtype == w2.dtype, "one dtype for x and the experts (tl.dot's operands)"
    ws1, ws3, ws2 = _checked_shared(shared, w13, w2)
    order, counts, starts = group_slots_by_expert(indices.long(), w13.shape[0], shared is not None)
    t = tiles  # spelt out field by field, as in small_batch_experts
    return _expert_major_op(x.contiguous(), order, counts, starts, weights.float().contiguous(), w13, w2, ws1, ws3, ws2,
                            t.block_m, t.block_i, t.block_d, t.up_warps, t.up_stages, t.block_d_out, t.block_i_in,
                            t.down_warps, t.down_stages)


def group_slots_by_expert(indices: Tensor, n_experts: int, shared: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A counting sort of the slots by expert, with no host sync and no data-dependent shape.  Slots are
    the N*K routed (token, k) pairs in row-major order, then (with a shared expert) one per token, whose
    expert id is E.  indices [N, K] int64 -> order [slots] int64 (the slots, grouped by expert, stable),
    counts [E(+1)] int32 (rows per expert) and starts [E(+1)] int32 (where each expert's group begins)."""
    ids = indices.reshape(-1)  # [N*K]: the expert of each routed slot
    if shared:
        ids = torch.cat([ids, ids.new_full((indices.shape[0],), n_experts)])
    counts = torch.zeros(n_experts + shared, dtype=torch.int32, device=ids.device)
    counts = counts.scatter_add(0, ids, torch.ones_like(ids, dtype=torch.int32))
    starts = counts.cumsum(0, dtype=torch.int32) - counts
    return stable_argsort(ids), counts, starts


def _checked_shared(shared, w13: Tensor, w2: Tensor) -> tuple:
    """The fused shared expert's (w1, w3, w2), checked against one routed expert's shapes, or three Nones."""
    if shared is None:
        return None, None, None
    ws1, ws3, ws2 = shared
    inter, d = w2.shape[2], w2.shape[1]
    assert ws1.shape == ws3.shape == (inter, d) and ws2.shape == (d, inter), \
        "a fused shared expert has one routed expert's shapes"
    assert all(w.is_contiguous() and w.dtype == w13.dtype for w in shared), "shared weights: contiguous, the experts' dtype"
    return ws1, ws3, ws2


def small_batch_experts_reference(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                                  shared: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """The twin: the same sum in fp32 over gathered copies of the chosen experts' weights (+ the shared expert)."""
    inter = w2.shape[-1]
    gate_up = torch.einsum("nkjd,nd->nkj", w13[indices].float(), x.float())  # [N, K, 2I]
    h = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]  # [N, K, I]
    y = torch.einsum("nkdi,nki->nkd", w2[indices].float(), h)  # [N, K, D]
    out = (weights.float().unsqueeze(-1) * y).sum(1)
    if shared is not None:
        ws1, ws3, ws2 = (w.float() for w in shared)
        xf = x.float()
        out = out + F.linear(F.silu(F.linear(xf, ws1)) * F.linear(xf, ws3), ws2)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------ kernels


@_jit
def _slot_rows(slot, NK, K: tl.constexpr, IDX, W, WS, STRIDE: tl.constexpr):
    """slot -> (its token, the first weight of its expert): routed slots (< NK = N*K) read expert
    IDX[slot] of the stacked W (STRIDE elements apart); the shared expert's slots (NK + token) read WS."""
    if slot < NK:
        token = slot // K
        base = W + tl.load(IDX + slot) * STRIDE  # int64 index: offsets past 2^31 elements (671B: 7.5e9) stay exact
    else:
        token = slot - NK
        base = WS
    return token, base


@_jit
def _gate_up_kernel(X, IDX, W13, WS1, WS3, H, NK, D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, EVEN_I: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    # slots vary fastest: two tokens' slots that picked one expert read its tile at about the same
    # time, so the second read likely hits L2
    slot = tl.program_id(0)
    token, gate_w = _slot_rows(slot, NK, K, IDX, W13, WS1, 2 * I * D)
    _, up_w = _slot_rows(slot, NK, K, IDX, W13 + I * D, WS3, 2 * I * D)  # up rows follow the gate rows
    _gate_up_rows(X, token, gate_w, up_w, H, slot, tl.program_id(1), D, I, BLOCK_I, BLOCK_D, EVEN_D, EVEN_I)


@_jit
def _gate_up_routed_kernel(X, PARTS, BIAS, IDX, GATES, W13, WS1, WS3, H, NK, scale, D: tl.constexpr, I: tl.constexpr,
                           K: tl.constexpr, E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr,
                           K_P2: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SPLIT: tl.constexpr,
                           SPLIT_P2: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
                           EVEN_D: tl.constexpr, EVEN_I: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    # _gate_up_kernel with the routing's selection done here: each routed slot's program sums its token's
    # partial router logits and picks the slot's expert (route_small.chosen_expert: the finishing kernel's
    # maths), so the step needs no selecting launch between the routing GEMV and the experts; the
    # programs of I tile 0 write the slot's expert and gate (IDX, GATES [N*K]) for the down kernel
    slot = tl.program_id(0)
    pid_i = tl.program_id(1)
    if slot < NK:
        token = slot // K
        e, gate = chosen_expert(PARTS, BIAS, token, slot % K, scale, E, G, TOPK_GROUP, K, K_P2, HAS_BIAS, NORM, SPLIT,
                                SPLIT_P2)
        if pid_i == 0:
            tl.store(IDX + slot, e)
            tl.store(GATES + slot, gate)
        gate_w = W13 + e * (2 * I * D)
    else:
        token = slot - NK
        gate_w = WS1
    if slot < NK:
        up_w = gate_w + I * D  # up rows follow the gate rows
    else:
        up_w = WS3
    _gate_up_rows(X, token, gate_w, up_w, H, slot, pid_i, D, I, BLOCK_I, BLOCK_D, EVEN_D, EVEN_I)


@_jit
def _gate_up_rows(X, token, gate_w, up_w, H, slot, pid_i, D: tl.constexpr, I: tl.constexpr, BLOCK_I: tl.constexpr,
                  BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, EVEN_I: tl.constexpr):
    # h[slot, I tile] = silu(gate rows . x[token]) * (up rows . x[token])
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < I
    x_ptrs = X + token * D + offs_d
    rows = offs_i[:, None] * D + offs_d[None, :]  # [BLOCK_I, BLOCK_D]
    g_ptrs, u_ptrs = gate_w + rows, up_w + rows
    acc_g = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)  # reduced over D once, after the loop
    acc_u = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D and EVEN_I:
            x = tl.load(x_ptrs)
            wg = tl.load(g_ptrs)
            wu = tl.load(u_ptrs)
        else:
            d_ok = d0 + offs_d < D
            w_ok = i_ok[:, None] & d_ok[None, :]
            x = tl.load(x_ptrs, mask=d_ok, other=0.0)
            wg = tl.load(g_ptrs, mask=w_ok, other=0.0)
            wu = tl.load(u_ptrs, mask=w_ok, other=0.0)
        xf = x.to(tl.float32)[None, :]
        acc_g += wg.to(tl.float32) * xf
        acc_u += wu.to(tl.float32) * xf
        x_ptrs += BLOCK_D
        g_ptrs += BLOCK_D
        u_ptrs += BLOCK_D
    gate = tl.sum(acc_g, axis=1)
    h = gate * tl.sigmoid(gate) * tl.sum(acc_u, axis=1)  # [BLOCK_I]
    if EVEN_I:
        tl.store(H + slot * I + offs_i, h)
    else:
        tl.store(H + slot * I + offs_i, h, mask=i_ok)


@_jit
def _down_kernel(H, IDX, GATES, W2, WS2, OUT, NK, D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                 SLOTS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, EVEN_D: tl.constexpr,
                 EVEN_I: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    # program (row, D tile): row is a slot (SLOTS = 1, "partials") or a token whose slots it sums in
    # order (SLOTS = K, or K + 1 with the shared expert last: "loop_k"); OUT [rows, D], row-major.
    # Rows vary fastest (experts picked twice: L2).  The shared expert's gate is 1.
    row = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, BLOCK_I)
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_D, BLOCK_I), dtype=tl.float32)  # reduced over I once, at the end
    for j in range(SLOTS):
        if SLOTS == 1:
            slot = row
        else:
            slot = tl.where(j < K, row * K + j, NK + row)
        _, w_base = _slot_rows(slot, NK, K, IDX, W2, WS2, D * I)
        gate = tl.load(GATES + slot, mask=slot < NK, other=1.0)
        w_ptrs = w_base + offs_d[:, None] * I + offs_i[None, :]  # [BLOCK_D, BLOCK_I]
        h_ptrs = H + slot * I + offs_i
        for i0 in range(0, I, BLOCK_I):
            if EVEN_D and EVEN_I:
                w = tl.load(w_ptrs)
                h = tl.load(h_ptrs)
            else:
                i_ok = i0 + offs_i < I
                w = tl.load(w_ptrs, mask=d_ok[:, None] & i_ok[None, :], other=0.0)
                h = tl.load(h_ptrs, mask=i_ok, other=0.0)
            acc += w.to(tl.float32) * (h * gate)[None, :]
            w_ptrs += BLOCK_I
            h_ptrs += BLOCK_I
    y = tl.sum(acc, axis=1).to(OUT.dtype.element_ty)
    if EVEN_D:
        tl.store(OUT + row * D + offs_d, y)
    else:
        tl.store(OUT + row * D + offs_d, y, mask=d_ok)


@_jit
def _expert_base(e, E: tl.constexpr, W, WS, STRIDE: tl.constexpr):
    """expert id -> its first weight: routed experts (< E) lie STRIDE elements apart in the stacked W; id E
    is the shared expert, WS.  int64: offsets past 2^31 elements (671B: 7.5e9) stay exact."""
    if e < E:
        base = W + e.to(tl.int64) * STRIDE
    else:
        base = WS
    return base


@_jit
def _group_rows(ORDER, start, count, m0, BLOCK_M: tl.constexpr):
    """Rows m0 .. m0 + BLOCK_M of one expert's group (ORDER[start:start + count]) -> (their slots [BLOCK_M],
    which rows are real): the rest pad the block to tl.dot's size and are masked to zero or not stored."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    real = offs_m < count
    return tl.load(ORDER + start + offs_m, mask=real, other=0), real


@_jit
def _em_gate_up_kernel(X, ORDER, COUNTS, STARTS, W13, WS1, WS3, H, NK, E: tl.constexpr, D: tl.constexpr,
                       I: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
                       BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, EVEN_I: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    # program (row block r, expert e, I tile); e = E is the shared expert.  Products are weights x rows^T
    # ([BLOCK_I, BLOCK_D] @ [BLOCK_D, BLOCK_M]): the weight tile is tl.dot's wide operand, the few rows
    # (padded to BLOCK_M with masked zeros) the narrow one.  The R = cdiv(N, BLOCK_M) row blocks of one
    # (expert, tile) are adjacent programs, launched side by side, so they stream the same [2 BLOCK_I, D]
    # weight tile at about the same time: HBM serves it once, L2 (mostly) the others.  (Looping over row
    # blocks in one program would re-read the tile only after the GPU had streamed the other experts'
    # tiles, up to ~270 MB at N = 64 of the bench config, far past the 60 MB L2.)  Top-k gives each
    # token distinct experts, so an expert has at most N rows (the shared one exactly N) and a program at
    # most one row block; a repeated expert's extra rows loop, R blocks apart, re-reading the tile.  A
    # program past its expert's rows runs no iteration and reads no weights.
    # h [slots, I] is written in the experts' dtype: the down kernel's tl.dot needs it in w2's dtype
    # anyway (as the grouped path's second GEMM takes h in bf16), so rounding here is the same rounding
    # and halves h's bytes and the down kernel's registers.  It is written in group order (row start + m,
    # not at the slot): the down kernel then reads an expert's h rows contiguously, and only affine
    # addresses are stored through here, so torch.compile's mutation analysis sees ORDER as read-only
    # (a store address loaded from ORDER marks it written, and a written input gets cloned).
    r = tl.program_id(0)
    e = tl.program_id(1)
    pid_i = tl.program_id(2)
    count = tl.load(COUNTS + e)
    start = tl.load(STARTS + e)
    gate_w = _expert_base(e, E, W13, WS1, 2 * I * D)
    up_w = _expert_base(e, E, W13 + I * D, WS3, 2 * I * D)  # up rows follow the gate rows
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < I
    w_rows = offs_i[:, None] * D + offs_d[None, :]  # [BLOCK_I, BLOCK_D]
    for m0 in range(r * BLOCK_M, count, tl.num_programs(0) * BLOCK_M):
        slot, real = _group_rows(ORDER, start, count, m0, BLOCK_M)
        token = tl.where(slot < NK, slot // K, slot - NK)  # routed slots are token * K + k; shared NK + token
        x_cols = token[None, :] * D + offs_d[:, None]  # x^T [BLOCK_D, BLOCK_M]
        acc_g = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D and EVEN_I:
                wg = tl.load(gate_w + w_rows + d0)
                wu = tl.load(up_w + w_rows + d0)
                xt = tl.load(X + x_cols + d0, mask=real[None, :], other=0.0)
            else:
                d_ok = d0 + offs_d < D
                w_ok = i_ok[:, None] & d_ok[None, :]
                wg = tl.load(gate_w + w_rows + d0, mask=w_ok, other=0.0)
                wu = tl.load(up_w + w_rows + d0, mask=w_ok, other=0.0)
                xt = tl.load(X + x_cols + d0, mask=real[None, :] & d_ok[:, None], other=0.0)
            # ieee: fp32 operands (the interpreter tests) stay fp32, not tf32; bf16 operands ignore it
            acc_g = tl.dot(wg, xt, acc_g, input_precision="ieee")
            acc_u = tl.dot(wu, xt, acc_u, input_precision="ieee")
        h = acc_g * tl.sigmoid(acc_g) * acc_u  # [BLOCK_I, BLOCK_M]: silu(gate) * up, fp32
        group_row = start + m0 + tl.arange(0, BLOCK_M)
        tl.store(H + group_row[None, :] * I + offs_i[:, None], h.to(H.dtype.element_ty),
                 mask=real[None, :] & i_ok[:, None])


@_jit
def _em_down_kernel(H, ORDER, COUNTS, STARTS, GATES, W2, WS2, P, NK, E: tl.constexpr, D: tl.constexpr,
                    I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
                    EVEN_D: tl.constexpr, EVEN_I: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    # program (row block r, expert e, D tile): P[slot, tile] = gate[slot] * (w2[e][tile] @ h[group row])
    # for the block's rows, fp32 partials [slots, D] at the slot index; the shared expert's gate is 1.
    # Row blocks share the weight tile through L2 as in the gate/up kernel.  (The store address comes from
    # ORDER, so compile's analysis counts ORDER as written here; this kernel is ORDER's last reader, so
    # Inductor can reuse it in place rather than clone it.)
    r = tl.program_id(0)
    e = tl.program_id(1)
    pid_d = tl.program_id(2)
    count = tl.load(COUNTS + e)
    start = tl.load(STARTS + e)
    w_base = _expert_base(e, E, W2, WS2, D * I)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, BLOCK_I)
    d_ok = offs_d < D
    w_rows = offs_d[:, None] * I + offs_i[None, :]  # [BLOCK_D, BLOCK_I]
    for m0 in range(r * BLOCK_M, count, tl.num_programs(0) * BLOCK_M):
        slot, real = _group_rows(ORDER, start, count, m0, BLOCK_M)
        gate = tl.load(GATES + slot, mask=real & (slot < NK), other=1.0)  # [BLOCK_M]
        group_row = start + m0 + tl.arange(0, BLOCK_M)
        h_cols = group_row[None, :] * I + offs_i[:, None]  # h^T [BLOCK_I, BLOCK_M]
        acc = tl.zeros((BLOCK_D, BLOCK_M), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            if EVEN_D and EVEN_I:
                w = tl.load(w_base + w_rows + i0)
                ht = tl.load(H + h_cols + i0, mask=real[None, :], other=0.0)
            else:
                i_ok = i0 + offs_i < I
                w = tl.load(w_base + w_rows + i0, mask=d_ok[:, None] & i_ok[None, :], other=0.0)
                ht = tl.load(H + h_cols + i0, mask=real[None, :] & i_ok[:, None], other=0.0)
            acc = tl.dot(w, ht, acc, input_precision="ieee")
        tl.store(P + slot[None, :] * D + offs_d[:, None], acc * gate[None, :], mask=real[None, :] & d_ok[:, None])


# ------------------------------------------------------------------------------------------ the op


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


@kernel_op("dsv3::small_batch_experts")
def _small_batch_experts_op(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                            ws1: Tensor | None, ws3: Tensor | None, ws2: Tensor | None,
                            up_block_i: int, up_block_d: int, up_warps: int, up_stages: int, down: str,
                            down_block_d: int, down_block_i: int, down_warps: int, down_stages: int) -> Tensor:
    # runs with real tensors (launches) and, as its own fake, with fake ones under torch.compile
    n, k = indices.shape
    d, inter = w2.shape[1], w2.shape[2]
    shared = ws1 is not None
    slots = n * k + (n if shared else 0)  # routed slots, then one shared slot per token
    if not shared:  # never read: no shared slot exists; any pointer of the weights' type will do
        ws1, ws3, ws2 = w13, w13, w2
    # tiles no larger than the (power-of-two rounded) dims: the tiny test configs stay cheap
    bi, bd = min(up_block_i, _pow2_at_least(inter)), min(up_block_d, _pow2_at_least(d))
    h = torch.empty(slots, inter, dtype=torch.float32, device=x.device)
    launch(_gate_up_kernel, n)[(slots, _cdiv(inter, bi))](
        x, indices, w13, ws1, ws3, h, n * k, D=d, I=inter, K=k, BLOCK_I=bi, BLOCK_D=bd, EVEN_D=d % bd == 0,
        EVEN_I=inter % bi == 0, num_warps=up_warps, num_stages=up_stages)
    return _launch_down(x, h, indices, weights, w2, ws2, n, k, shared, down, down_block_d, down_block_i, down_warps,
                        down_stages)


@kernel_op("dsv3::small_batch_experts_routed")
def _small_batch_experts_routed_op(x: Tensor, parts: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int,
                                   norm: bool, scale: float, w13: Tensor, w2: Tensor, ws1: Tensor | None,
                                   ws3: Tensor | None, ws2: Tensor | None, up_block_i: int, up_block_d: int,
                                   up_warps: int, up_stages: int, down: str, down_block_d: int, down_block_i: int,
                                   down_warps: int, down_stages: int) -> Tensor:
    n, split, e = parts.shape
    d, inter = w2.shape[1], w2.shape[2]
    shared = ws1 is not None
    slots = n * k + (n if shared else 0)
    if not shared:
        ws1, ws3, ws2 = w13, w13, w2
    bi, bd = min(up_block_i, _pow2_at_least(inter)), min(up_block_d, _pow2_at_least(d))
    h = torch.empty(slots, inter, dtype=torch.float32, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)  # written by the gate/up programs
    weights = torch.empty(n, k, dtype=torch.float32, device=x.device)
    if n:
        launch(_gate_up_routed_kernel, n)[(slots, _cdiv(inter, bi))](
            x, parts, bias, indices, weights, w13, ws1, ws3, h, n * k, scale, D=d, I=inter, K=k, E=e, G=n_group,
            TOPK_GROUP=topk_group, K_P2=_pow2_at_least(k), HAS_BIAS=bias.numel() > 0, NORM=norm, SPLIT=split,
            SPLIT_P2=_pow2_at_least(split), BLOCK_I=bi, BLOCK_D=bd, EVEN_D=d % bd == 0, EVEN_I=inter % bi == 0,
            num_warps=up_warps, num_stages=up_stages)
    return _launch_down(x, h, indices, weights, w2, ws2, n, k, shared, down, down_block_d, down_block_i, down_warps,
                        down_stages)


def _launch_down(x, h, indices, weights, w2, ws2, n, k, shared, down, down_block_d, down_block_i, down_warps,
                 down_stages):
    """The down kernel over h [slots, I] -> [N, D] in x's dtype (see the module docstring's two variants)."""
    d, inter = w2.shape[1], w2.shape[2]
    slots = n * k + (n if shared else 0)
    partials = down == "partials"
    rows = slots if partials else n
    out = torch.empty(rows, d, dtype=torch.float32 if partials else x.dtype, device=x.device)
    bd, bi = min(down_block_d, _pow2_at_least(d)), min(down_block_i, _pow2_at_least(inter))
    if rows:
        launch(_down_kernel, n)[(rows, _cdiv(d, bd))](
            h, indices, weights, w2, ws2, out, n * k, D=d, I=inter, K=k, SLOTS=1 if partials else k + shared,
            BLOCK_D=bd, BLOCK_I=bi, EVEN_D=d % bd == 0, EVEN_I=inter % bi == 0, num_warps=down_warps,
            num_stages=down_stages)
    if not partials:
        return out
    routed = out[:n * k].view(n, k, d).sum(1)
    return (routed + out[n * k:] if shared else routed).to(x.dtype)


def _dot_tile(block: int, dim: int) -> int:
    """A tile no larger than the (power-of-two rounded) dim, and at least tl.dot's least size, 16."""
    return max(16, min(block, _pow2_at_least(dim)))


@kernel_op("dsv3::expert_major_experts")
def _expert_major_op(x: Tensor, order: Tensor, counts: Tensor, starts: Tensor, weights: Tensor, w13: Tensor,
                     w2: Tensor, ws1: Tensor | None, ws3: Tensor | None, ws2: Tensor | None, block_m: int, block_i: int,
                     block_d: int, up_warps: int, up_stages: int, block_d_out: int, block_i_in: int, down_warps: int,
                     down_stages: int) -> Tensor:
    # runs with real tensors (launches) and, as its own fake, with fake ones under torch.compile
    n, k = weights.shape
    e, d, inter = w2.shape
    shared = ws1 is not None
    groups, slots = counts.shape[0], order.shape[0]  # E (+1 shared), N*K (+N shared)
    if not shared:  # never read: no group has id E; any pointer of the weights' type will do
        ws1, ws3, ws2 = w13, w13, w2
    bm = max(16, block_m)
    row_blocks = _cdiv(n, bm)  # an expert's rows: at most N with distinct experts per token (see the kernel)
    h = torch.empty(slots, inter, dtype=w2.dtype, device=x.device)  # _em_gate_up_kernel says why not fp32
    bi, bd = _dot_tile(block_i, inter), _dot_tile(block_d, d)
    launch(_em_gate_up_kernel, n)[(row_blocks, groups, _cdiv(inter, bi))](
        x, order, counts, starts, w13, ws1, ws3, h, n * k, E=e, D=d, I=inter, K=k, BLOCK_M=bm, BLOCK_I=bi,
        BLOCK_D=bd, EVEN_D=d % bd == 0, EVEN_I=inter % bi == 0, num_warps=up_warps, num_stages=up_stages)
    partials = torch.empty(slots, d, dtype=torch.float32, device=x.device)
    bd, bi = _dot_tile(block_d_out, d), _dot_tile(block_i_in, inter)
    launch(_em_down_kernel, n)[(row_blocks, groups, _cdiv(d, bd))](
        h, order, counts, starts, weights, w2, ws2, partials, n * k, E=e, D=d, I=inter, BLOCK_M=bm, BLOCK_D=bd,
        BLOCK_I=bi, EVEN_D=d % bd == 0, EVEN_I=inter % bi == 0, num_warps=down_warps, num_stages=down_stages)
    routed = partials[:n * k].view(n, k, d).sum(1)  # each token's K partials, in a fixed order
    return (routed + partials[n * k:] if shared else routed).to(x.dtype)
