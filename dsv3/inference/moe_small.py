"""Routed experts for a few tokens: each (token, expert) slot reads its expert's weights by index.

At decode batch 1-4 the routed experts are matrix-vector products bound by the weight bytes read.  The
grouped path (dispatcher sort, two `torch._grouped_mm`, SwiGLU, combine) spends ~6 kernels on it; here
two Triton kernels read only the chosen experts' rows, in place (no weight copies, no sort):

  gate/up   program (slot, I tile): BLOCK_I gate rows and BLOCK_I up rows of expert e = indices[slot]
            against the slot's token x [D]  ->  h[slot] = silu(gate) * up, [N*K, I] fp32.
  down      rows of w2[e] against h[slot], times the slot's gate, summed over the token's K slots in a
            fixed order (no atomics, so deterministic and CUDA-graph replays are bit-equal):
              "loop_k"    program (token, D tile) loops over its K slots and writes out [N, D];
              "partials"  program (slot, D tile) writes an fp32 partial [N*K, D]; torch sums over K.

A shared expert of one routed expert's size (DeepSeek-V3's: one, of moe_intermediate_size) can ride
along as one more slot per token with gate 1 (`shared=`): at batch 1 its three GEMVs and the add were
four more launches per layer for 12 MB.

h is fp32: at most N*K*I*4 bytes (32 KB at batch 1 of the bench config, against 100 MB of weights),
so it costs nothing, and the only roundings left are the bf16 inputs and the output.  Tiles are
arguments (`Tiles`), swept by bench/moe_small_kernel.py; they are not autotuned (compile time).

`small_batch_experts` is a `torch.library.triton_op`, so `torch.compile(fullgraph=True)` traces into
the launches without a graph break and the captured decode step replays them.  Its twin
`small_batch_experts_reference` gathers the chosen experts' weights and does the maths in fp32 in
torch (CPU and tests).  Not here: FP8 weights, and the rule's other half (plain local experts), which
`moe.py` checks.  Written by hand because no library offers an index-gathered MoE GEMV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


@dataclass(frozen=True)
class Tiles:
    """Compile-time choices of the two kernels.  Defaults: the fastest of bench/moe_small_kernel.py's
    sweep on an H200 at the bench shapes (commit 7a333d8, bench/results/moe_small_kernel_2026-12-01.json):
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


def small_batch_experts(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                        tiles: Tiles = Tiles(), shared: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """x [N, D], indices [N, K] int64, weights [N, K] (gates, normalised and scaled), w13 [E, 2I, D]
    (gate rows, then up rows), w2 [E, D, I] -> [N, D] in x's dtype, fp32 accumulation.
    shared: a shared expert of the same size, (w1 [I, D], w3 [I, D], w2 [D, I]), rides along as one
    more slot per token with gate 1 (its three GEMVs and the add cost launches, not bytes, at batch 1)."""
    if tiles.down not in ("partials", "loop_k"):
        raise ValueError(f"unknown down-projection variant {tiles.down!r}; choose 'partials' or 'loop_k'")
    assert w13.is_contiguous() and w2.is_contiguous(), "the kernels address expert weights by flat offsets"
    ws1, ws3, ws2 = shared if shared is not None else (None, None, None)
    if shared is not None:
        inter, d = w2.shape[2], w2.shape[1]
        assert ws1.shape == ws3.shape == (inter, d) and ws2.shape == (d, inter), \
            "a fused shared expert has one routed expert's shapes"
        assert all(w.is_contiguous() and w.dtype == w13.dtype for w in shared), "shared weights: contiguous, the experts' dtype"
    t = tiles  # spelt out field by field: torch.compile traces attribute reads, not dataclasses.astuple
    return _small_batch_experts_op(x.contiguous(), indices.long().contiguous(), weights.float().contiguous(), w13, w2,
                                   ws1, ws3, ws2,
                                   t.up_block_i, t.up_block_d, t.up_warps, t.up_stages, t.down,
                                   t.down_block_d, t.down_block_i, t.down_warps, t.down_stages)


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
                    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, EVEN_I: tl.constexpr):
    # slots vary fastest: two tokens' slots that picked one expert read its tile at about the same
    # time, so the second read likely hits L2
    slot = tl.program_id(0)
    pid_i = tl.program_id(1)
    token, gate_w = _slot_rows(slot, NK, K, IDX, W13, WS1, 2 * I * D)
    _, up_w = _slot_rows(slot, NK, K, IDX, W13 + I * D, WS3, 2 * I * D)  # up rows follow the gate rows
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
                 EVEN_I: tl.constexpr):
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


# ------------------------------------------------------------------------------------------ the op


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


@torch.library.triton_op("dsv3::small_batch_experts", mutates_args=())
def _small_batch_experts_op(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                            ws1: Tensor | None, ws3: Tensor | None, ws2: Tensor | None,
                            up_block_i: int, up_block_d: int, up_warps: int, up_stages: int, down: str,
                            down_block_d: int, down_block_i: int, down_warps: int, down_stages: int) -> Tensor:
    # runs with real tensors (launches) and, as its own fake, with fake ones under torch.compile
    wrap = torch.library.wrap_triton
    n, k = indices.shape
    d, inter = w2.shape[1], w2.shape[2]
    shared = ws1 is not None
    slots = n * k + (n if shared else 0)  # routed slots, then one shared slot per token
    if not shared:  # never read: no shared slot exists; any pointer of the weights' type will do
        ws1, ws3, ws2 = w13, w13, w2
    # tiles no larger than the (power-of-two rounded) dims: the tiny test configs stay cheap
    bi, bd = min(up_block_i, _pow2_at_least(inter)), min(up_block_d, _pow2_at_least(d))
    h = torch.empty(slots, inter, dtype=torch.float32, device=x.device)
    wrap(_gate_up_kernel)[(slots, _cdiv(inter, bi))](
        x, indices, w13, ws1, ws3, h, n * k, D=d, I=inter, K=k, BLOCK_I=bi, BLOCK_D=bd, EVEN_D=d % bd == 0,
        EVEN_I=inter % bi == 0, num_warps=up_warps, num_stages=up_stages)
    partials = down == "partials"
    rows = slots if partials else n
    out = torch.empty(rows, d, dtype=torch.float32 if partials else x.dtype, device=x.device)
    bd, bi = min(down_block_d, _pow2_at_least(d)), min(down_block_i, _pow2_at_least(inter))
    wrap(_down_kernel)[(rows, _cdiv(d, bd))](
        h, indices, weights, w2, ws2, out, n * k, D=d, I=inter, K=k, SLOTS=1 if partials else k + shared,
        BLOCK_D=bd, BLOCK_I=bi, EVEN_D=d % bd == 0, EVEN_I=inter % bi == 0, num_warps=down_warps,
        num_stages=down_stages)
    if not partials:
        return out
    routed = out[:n * k].view(n, k, d).sum(1)
    return (routed + out[n * k:] if shared else routed).to(x.dtype)
