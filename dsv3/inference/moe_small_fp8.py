"""An FP8 checkpoint's routed experts for a few tokens (decode at batch 1-4 with e4m3 weights): moe_small.py's
slot-major pair of kernels over `FP8InferenceExperts`' stacked e4m3 weights and 128x128 scales.

`FP8InferenceExperts` otherwise runs the training path at every batch: the dispatcher's sort, a
quantising launch, the grouped block-scaled GEMM, SwiGLU, another quantising launch, the second
grouped GEMM and the combine.  Here, as in moe_small.py, each (token, expert) slot reads only its
expert's rows, with no sort and no host sync:

  gate/up   program (slot, I tile): x[token] quantised per 1x128 tile in the program (the bytes of
            `reference.quant_rows`), BLOCK_I gate rows and BLOCK_I up rows of expert IDX[slot] in e4m3,
            each 128-deep dot promoted into fp32 with x's and the block's scales  ->  h[slot] =
            silu(gate) * up, [N*K, I] fp32.
  down      program (token, D tile): for each of the token's K slots in order, h[slot] quantised per
            1x128 tile, rows of w2[e] in e4m3, promoted per 128, times the slot's gate, summed in fp32
            (no atomics: deterministic, and CUDA-graph replays are bit-equal)  ->  out [N, D] in x's dtype.

So it computes what `small_batch_experts_fp8_reference` does in torch: FP8InferenceExperts' maths with
h kept in fp32 between the GEMMs (the grouped path rounds h to x's dtype before quantising it: BF16's
rounding, below e4m3's).  Needs I a multiple of 128 (FP8InferenceExperts' condition too).

`FP8_SMALL_EXPERTS` (off): `moe.py` takes these kernels for FP8InferenceExperts under moe_small's N*K <= E rule
while it is set.  Off until `bench/decode.py --sections dsv3,fp8` times it on a GPU (written 2026-12-03
without device time).  Ops are `torch.library.triton_op`s, so compiled, captured decode steps trace into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fp8 import reference as ref
from .triton_ops import HAVE_TRITON, await_previous_kernel, kernel_op, launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ..fp8.kernels import _quantise, _scale

    _jit = triton.jit
else:  # CPU-only torch builds ship without Triton; FP8 experts then run the grouped reference path

    def _jit(fn):
        return fn


FP8_SMALL_EXPERTS = False  # read at trace time: set it before the first generate
BLOCK = 128


def use_small_batch_fp8(n_tokens: int, k: int, n_experts: int, x: Tensor) -> bool:
    """moe_small.use_small_batch's rule for FP8InferenceExperts, while FP8_SMALL_EXPERTS is set: CUDA, N*K <= E."""
    return FP8_SMALL_EXPERTS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float32) and n_tokens * k <= n_experts


def small_batch_experts_fp8(x: Tensor, indices: Tensor, weights: Tensor, experts, block_i: int = 32, block_d: int = 32,
                            warps: int = 4) -> Tensor:
    """x [N, D], indices / weights [N, K] (chosen experts and their gates) through FP8InferenceExperts `experts`
    -> [N, D] in x's dtype."""
    for name, b in (("block_i", block_i), ("block_d", block_d)):
        if b < 1 or BLOCK % b or b & (b - 1):
            raise ValueError(f"{name} must be a power of two dividing {BLOCK}, got {b}")
    assert experts.inter % BLOCK == 0, "FP8 stacked experts have 128-row gate and up blocks"
    return _small_batch_experts_fp8_op(x.contiguous(), indices.contiguous(), weights.float().contiguous(), experts.w13,
                                       experts.w13_scale_inv, experts.w2, experts.w2_scale_inv, experts.pow2,
                                       block_i, block_d, warps)


def gate_up_fp8(x: Tensor, indices: Tensor, w13: Tensor, w13_s: Tensor, pow2: bool, block_i: int = 32,
                warps: int = 4) -> Tensor:
    """The first kernel alone: h [N*K, I] fp32 (tests)."""
    return _gate_up_fp8_op(x.contiguous(), indices.contiguous(), w13, w13_s, pow2, block_i, warps)


def down_fp8(h: Tensor, indices: Tensor, weights: Tensor, w2: Tensor, w2_s: Tensor, dim: int, out_dtype: torch.dtype,
             pow2: bool, block_d: int = 32, warps: int = 4) -> Tensor:
    """The second kernel alone, on a given h [N*K, I] (tests)."""
    return _down_fp8_op(h.contiguous(), indices.contiguous(), weights.float().contiguous(), w2, w2_s, dim, out_dtype,
                        pow2, block_d, warps)


def small_batch_experts_fp8_reference(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w13_s: Tensor, w2: Tensor,
                                      w2_s: Tensor, dim: int, pow2: bool, h: Tensor | None = None) -> Tensor:
    """The twin in torch (reference.quant_rows and reference.gemm per slot), h [N*K, I] fp32 between the GEMMs;
    with h given, only the down half (its test)."""
    n, k = indices.shape
    inter = w2.shape[-1]
    if h is None:
        xq, xs = ref.quant_rows(x.float(), pow2)
        rows = []
        for slot, e in enumerate(indices.reshape(-1).tolist()):
            t = slot // k
            gate_up = ref.gemm(xq[t:t + 1], xs[t:t + 1], w13[e], w13_s[e])  # [1, 2I] fp32
            rows.append(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        h = torch.cat(rows)
    out = torch.zeros(n, dim, dtype=torch.float32, device=x.device)
    for slot, e in enumerate(indices.reshape(-1).tolist()):
        hq, hs = ref.quant_rows(h[slot:slot + 1].float(), pow2)
        y = ref.gemm(hq, hs, w2[e], w2_s[e])[:, :dim]
        out[slot // k] += weights.reshape(-1)[slot].float() * y[0]
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------ kernels


@_jit
def _gate_up_fp8_kernel(X, IDX, W13, WS13, H, D, I: tl.constexpr, DP: tl.constexpr, K: tl.constexpr,
                        BLOCK_I: tl.constexpr, POW2: tl.constexpr, PDL: tl.constexpr):
    # grid (N*K, I / BLOCK_I): h[slot, I tile] = silu(gate rows . xq) * (up rows . xq), promoted per 128 of D
    slot = tl.program_id(0)
    pid_i = tl.program_id(1)
    token = slot // K
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, 128)
    await_previous_kernel(PDL)
    e = tl.load(IDX + slot).to(tl.int64)
    w = W13 + e * (2 * I * DP)
    ws = WS13 + e * ((2 * I // 128) * (DP // 128))
    g_ptrs = w + offs_i[:, None] * DP + offs_k[None, :]  # [BLOCK_I, 128] gate rows; up rows I further
    g_scale = ws + (pid_i * BLOCK_I // 128) * (DP // 128)
    u_scale = ws + ((I + pid_i * BLOCK_I) // 128) * (DP // 128)
    acc_g = tl.zeros((BLOCK_I,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for kb in range(0, DP // 128):
        d = kb * 128 + offs_k
        x = tl.load(X + token * D + d, mask=d < D, other=0.0).to(tl.float32)
        s = _scale(tl.max(tl.abs(x), axis=0), POW2)
        xq = _quantise(x, s, True).to(tl.float32)
        wg = tl.load(g_ptrs).to(tl.float32)
        wu = tl.load(g_ptrs + I * DP).to(tl.float32)
        acc_g += tl.sum(wg * xq[None, :], axis=1) * (s * tl.load(g_scale + kb))
        acc_u += tl.sum(wu * xq[None, :], axis=1) * (s * tl.load(u_scale + kb))
        g_ptrs += 128
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(H + slot * I + offs_i, h)


@_jit
def _down_fp8_kernel(H, IDX, GATES, W2, WS2, OUT, D, I: tl.constexpr, DP: tl.constexpr, K: tl.constexpr,
                     BLOCK_D: tl.constexpr, POW2: tl.constexpr, PDL: tl.constexpr):
    # grid (N, cdiv(D, BLOCK_D)): out[token, D tile] = sum over its K slots, in order, of gate * (w2[e] rows . hq)
    token = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # < DP: w2's rows are padded to 128
    offs_k = tl.arange(0, 128)
    await_previous_kernel(PDL)
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(0, K):
        slot = token * K + j
        e = tl.load(IDX + slot).to(tl.int64)
        w_ptrs = W2 + e * (DP * I) + offs_d[:, None] * I + offs_k[None, :]  # [BLOCK_D, 128]
        w_scale = WS2 + e * ((DP // 128) * (I // 128)) + (pid_d * BLOCK_D // 128) * (I // 128)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for kb in range(0, I // 128):
            h = tl.load(H + slot * I + kb * 128 + offs_k)
            s = _scale(tl.max(tl.abs(h), axis=0), POW2)
            hq = _quantise(h, s, True).to(tl.float32)
            acc += tl.sum(tl.load(w_ptrs).to(tl.float32) * hq[None, :], axis=1) * (s * tl.load(w_scale + kb))
            w_ptrs += 128
        total += tl.load(GATES + slot) * acc
    tl.store(OUT + token * D + offs_d, total.to(OUT.dtype.element_ty), mask=offs_d < D)


# ------------------------------------------------------------------------------------------ the ops


def _launch_gate_up(x, indices, w13, w13_s, pow2, block_i, warps):
    n, k = indices.shape
    _, two_i, dp = w13.shape
    h = torch.empty(n * k, two_i // 2, dtype=torch.float32, device=x.device)
    launch(_gate_up_fp8_kernel, n)[(n * k, two_i // 2 // block_i)](
        x, indices, w13, w13_s, h, x.shape[1], I=two_i // 2, DP=dp, K=k, BLOCK_I=block_i, POW2=pow2, num_warps=warps)
    return h


def _launch_down(h, indices, weights, w2, w2_s, dim, out_dtype, pow2, block_d, warps):
    n, k = indices.shape
    _, dp, inter = w2.shape
    out = torch.empty(n, dim, dtype=out_dtype, device=h.device)
    launch(_down_fp8_kernel, n)[(n, (dim + block_d - 1) // block_d)](
        h, indices, weights, w2, w2_s, out, dim, I=inter, DP=dp, K=k, BLOCK_D=block_d, POW2=pow2, num_warps=warps)
    return out


@kernel_op("dsv3::small_batch_experts_fp8")
def _small_batch_experts_fp8_op(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w13_s: Tensor, w2: Tensor,
                                w2_s: Tensor, pow2: bool, block_i: int, block_d: int, warps: int) -> Tensor:
    h = _launch_gate_up(x, indices, w13, w13_s, pow2, block_i, warps)
    return _launch_down(h, indices, weights, w2, w2_s, x.shape[1], x.dtype, pow2, block_d, warps)


@kernel_op("dsv3::gate_up_fp8")
def _gate_up_fp8_op(x: Tensor, indices: Tensor, w13: Tensor, w13_s: Tensor, pow2: bool, block_i: int, warps: int) -> Tensor:
    return _launch_gate_up(x, indices, w13, w13_s, pow2, block_i, warps)


@kernel_op("dsv3::down_fp8")
def _down_fp8_op(h: Tensor, indices: Tensor, weights: Tensor, w2: Tensor, w2_s: Tensor, dim: int, out_dtype: torch.dtype,
                 pow2: bool, block_d: int, warps: int) -> Tensor:
    return _launch_down(h, indices, weights, w2, w2_s, dim, out_dtype, pow2, block_d, warps)
