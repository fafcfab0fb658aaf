"""An FP8 checkpoint's linear for a few rows (decode at batch 1-8 with e4m3 weights): one Triton kernel.

`FP8InferenceLinear` otherwise runs the training kernels: a launch that quantises x (1x128 tiles), then a
block-scaled GEMM built for thousands of rows.  Here each program owns BLOCK_N output features (a
divisor of 128, so one row of 128x128 weight scales) and streams their e4m3 rows over K in 128-wide
blocks, once for all M <= 8 rows of x.  Per block it quantises x's rows to e4m3 with their 1x128 scale
(`kernels._scale` / `_quantise`: the bytes of `reference.quant_rows`), takes the 128-deep dot of the
e4m3 values in fp32, and adds it times x's scale and the weight block's scale into an fp32 accumulator:
the report's promotion every 128, as `reference.gemm`.  So the result is `ops.gemm(*ops.quant_rows(x),
w, w_s)` up to the order of fp32 sums, with x never written quantised and each weight byte read once.

Tiles (`Fp8GemvTiles`, swept by bench/gemv_fp8_kernel.py): BLOCK_N output features per program (a divisor
of 128, so one row of weight scales), GROUPS 128-wide blocks of K per loop step (GROUPS * BLOCK_N * 128
weight bytes per step: the first version read one block, 2 KB a step, and decoded at 9 % of its roofline
on the H200), and split-K: SPLIT_K programs per N tile, each over its share of whole blocks, writing an
fp32 partial [SPLIT_K, M, N] that torch sums in a fixed order (no atomics: deterministic, and CUDA-graph
replays are bit-equal).  The dot, a compile-time choice (`mma`, as gemv.py's):
  fma   [BLOCK_M, BLOCK_N, 128] fp32 products summed per block: nothing wasted at one row, registers
        grow with M (the default up to FMA_MAX_ROWS rows);
  mma   tl.dot(w tile [BLOCK_N, 128], x^T [128, 16]) with x's rows padded to 16, operands in bf16 on the
        GPU (every e4m3 value is exact in bf16, so the products are exact in fp32), fp32 under
        Triton's interpreter (its bf16 tl.dot multiplies raw bits).

`weight_only` (W8A16, as vLLM's Marlin FP8 kernels and TensorRT-LLM's small-batch FP8 paths do): x is not
quantised.  On the tensor cores x's columns are multiplied by their block's weight scale and rounded once to
bf16 (an activation's BF16 rounding), and one dot per step takes the e4m3 weights as bf16 (exact): gemv.py's
BF16 kernel plus a conversion, on half the bytes.  With `block_dots` one dot per 128-wide block takes x in
bf16 as loaded and the block's weight scale goes on its fp32 result: no per-element work on x (padded to 16
rows there), no rounding of x times the scale, and no quantising launch (sm_90 PTX from Triton 3.9's
ahead-of-time compile, 2 warps, per loop body: 32 fp32 multiplies against 256 for the one-dot form; 128 e4m3x2
conversions, each followed by two fp16-to-bf16 ones, against the prequant form's 256 for weights and x; untimed).  The fma form scales each block's products in fp32.
The result differs from the FP8 layers' path by the activation quantisation it skips.  Twin:
`F.linear(x, dequant_blocks(w, w_s))` in fp32.

`small_m_linear_fp8_pair`: two FP8InferenceLinears of one x (wq_a and wkv_a, w1 and w3) in one launch, as gemv.py's
pair; `gemv.decode_linear_pair` takes it under FP8_GEMV.

On the tensor cores the e4m3 operands go to fp16, which holds every e4m3 value (one conversion per two values).
sm_90 PTX from Triton 3.9's ahead-of-time compile (2026-12-03, no GPU timing), per loop body: the first form
(through fp32 and bf16) had 873 conversions with in-kernel quantisation and 1,212 with prequant, now 361 and
444, against 13 in gemv.py's BF16 kernel; the in-kernel quantisation also costs 42 barriers and 448 shuffles
against the BF16 kernel's 4 and 0.  (Those counts came from a compile without JIT's 16-divisibility hints, whose
loads were single bytes; with the hints, 32 x 4 blocks and 4 warps, prequant has 4 barriers and no shuffles.)

`FP8_GEMV` (on since H200 run 26): `gemv.decode_linear` takes this kernel for an FP8InferenceLinear over at
most gemv.MAX_ROWS rows on CUDA.  End to end (bench/decode.py --sections dsv3,fp8, bench config, commit
dc331c4) an FP8 checkpoint decoded at 731.6 tok/s at batch 1 through the training kernels, 1,058.7 with this
kernel and 1,320.6 with moe_small_fp8's experts too (BF16 weights: 1,615.6); at batch 8 4,068.1, 5,719.1 and
5,703.2 (BF16 6,601.2).  The first version (run 25) had lost: 521 against 739 tok/s at batch 1.
The op is a `torch.library.triton_op` like gemv.py's, so compiled,
captured decode steps trace into it.  Twin: `ops.gemm(*ops.quant_rows(x))` (tests/test_gemv_fp8.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..fp8 import ops
from .triton_ops import HAVE_TRITON, await_previous_kernel, kernel_op, launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ..fp8.kernels import _quantise, _scale

    _jit = triton.jit
else:  # CPU-only torch builds ship without Triton; FP8 layers then run the reference path

    def _jit(fn):
        return fn


FP8_GEMV = True  # read at trace time: set it before the first generate
# FP8 checkpoints' decode kernels (this one and moe_small_fp8's) with x unquantised (W8A16, `weight_only`) instead
# of the FP8 layers' W8A8 maths.  Off: with it the linears lost (run 26, batch 1: 1,142.0 against 1,320.6 tok/s);
# moe_small_fp8.DECODE_TILES takes the weight-only form for the experts alone.  Read at trace time.
WEIGHT_ONLY = False
FMA_MAX_ROWS = 2  # fma products up to this many rows of x, tensor cores beyond
BLOCK = 128


@dataclass(frozen=True)
class Fp8GemvTiles:
    """Compile-time choices of the kernel (bench/gemv_fp8_kernel.py sweeps them).  Defaults: the best single
    tiles of the H200 sweep at commit 048ffb2 (bench/results/gemv_fp8_kernel_2026-12-03_run25_048ffb2.json):
    tensor cores, 32 rows x 4 blocks, in-kernel quantisation.  DECODE_TILES below is run 26's winner
    (gemv_fp8_kernel_2026-12-03_run26_4b08919.json): the same with 2 warps and x quantised by one launch first.
    One decode step's dense projections at M=1 take 543.4 us with it, 855.6 through the FP8 layers' path,
    406.8 through gemv.py's BF16 kernel on twice the bytes: the small matrices sit at a ~9 us floor
    (BF16: ~6 us); the head (26.0 against 37.3 us) and dense w1/w3 win."""

    mma: bool | None = True  # None: fma up to FMA_MAX_ROWS rows of x, tensor cores above
    block_n: int = 32  # output features per program: a power of two dividing 128 (mma: at least 16)
    groups: int = 4  # 128-wide blocks of K per loop step
    warps: int = 4
    stages: int = 3
    split_k: int = 1  # programs per N tile, each over its share of K's blocks
    prequant: bool = False  # x quantised by one launch of the training quantiser first, read as e4m3 by the kernel
    weight_only: bool = False  # x unquantised (W8A16): e4m3 weights against x, the block scales on x's side
    # weight_only on the tensor cores: one dot per 128-wide block of bf16 x as loaded, its weight scale on the fp32
    # result (no per-element work on x, which is padded to 16 rows there), instead of one dot per step on x's
    # columns times their scales
    block_dots: bool = False


DECODE_TILES = Fp8GemvTiles(warps=2, prequant=True)  # run 26's best single tiles at M = 1, 2, 8 (Fp8GemvTiles)


def decode_tiles() -> Fp8GemvTiles:
    """The tiles the decode step runs with: DECODE_TILES, in the W8A16 form while WEIGHT_ONLY is set."""
    return replace(DECODE_TILES, weight_only=True, prequant=False) if WEIGHT_ONLY else DECODE_TILES


def use_small_m_linear_fp8(x: Tensor, weight: Tensor, weight_scale_inv: Tensor) -> bool:
    """The rule `decode_linear` applies with FP8_GEMV on: CUDA, a 2-D x of at most 8 rows (gemv.MAX_ROWS)
    in BF16 or fp32, an e4m3 weight [Np, Kp] padded to 128 with its [Np/128, Kp/128] fp32 scales."""
    return (FP8_GEMV and x.is_cuda and x.dim() == 2 and x.shape[0] <= 8 and x.dtype in (torch.bfloat16, torch.float32)
            and weight.dtype == torch.float8_e4m3fn and weight.is_contiguous() and weight_scale_inv.is_contiguous()
            and weight.shape[1] >= x.shape[1] and weight.shape[1] % BLOCK == 0 and weight.shape[0] % BLOCK == 0)


def small_m_linear_fp8(x: Tensor, weight: Tensor, weight_scale_inv: Tensor, out_features: int, pow2: bool = False,
                       tiles: Fp8GemvTiles = Fp8GemvTiles()) -> Tensor:
    """x [M, K] (K <= Kp) times the e4m3 weight [Np, Kp] with 128x128 scales [Np/128, Kp/128] -> [M, out_features]
    in x's dtype: x quantised per 1x128 tile (power-of-two scales with pow2), fp32 promotion per block."""
    t = tiles
    _check(t)
    assert x.dim() == 2 and x.shape[1] <= weight.shape[1] and out_features <= weight.shape[0], \
        f"x [M, K] against the padded weight [Np, Kp], got {tuple(x.shape)} and {tuple(weight.shape)}"
    assert weight.shape[0] % BLOCK == 0 and weight.shape[1] % BLOCK == 0, "the weight is padded to 128"
    mma = x.shape[0] > FMA_MAX_ROWS if t.mma is None else t.mma
    x = x.contiguous()
    xq, xs = _prepared(x, pow2, t)
    return _small_m_linear_fp8_op(x, xq, xs, weight, weight_scale_inv.contiguous(), out_features, pow2, mma,
                                  max(t.block_n, 16) if mma else t.block_n, t.groups, t.warps, t.stages, t.split_k,
                                  t.prequant, t.weight_only, t.block_dots)


def _check(t: Fp8GemvTiles) -> None:
    if t.block_n < 1 or BLOCK % t.block_n or (t.block_n & (t.block_n - 1)):
        raise ValueError(f"Fp8GemvTiles.block_n must be a power of two dividing {BLOCK}, got {t.block_n}")
    if t.groups < 1 or t.split_k < 1 or t.stages < 1:
        raise ValueError(f"Fp8GemvTiles.groups, split_k and stages must be >= 1, got {t}")
    if t.weight_only and t.prequant:
        raise ValueError("Fp8GemvTiles: weight_only reads x unquantised; prequant quantises it")
    if t.block_dots and not t.weight_only:
        raise ValueError("Fp8GemvTiles: block_dots is a form of weight_only")


def _prepared(x: Tensor, pow2: bool, t: Fp8GemvTiles) -> tuple[Tensor, Tensor]:
    """What the kernel reads as x: with prequant e4m3 x [M, ceil128(K)] and its 1x128 scales (the bytes the
    in-kernel quantisation makes), else x itself and an empty scale tensor."""
    if t.prequant:
        return ops.quant_rows(x, pow2, ops.default_backend(x.device))
    return x, x.new_empty(0, 0, dtype=torch.float32)


def use_pair_fp8(x: Tensor, first, second) -> bool:
    """Two FP8InferenceLinears of one input (wq_a and wkv_a; w1 and w3) in one launch: each under the single rule,
    the same padded K and scale kind."""
    return (use_small_m_linear_fp8(x, first.weight, first.weight_scale_inv)
            and use_small_m_linear_fp8(x, second.weight, second.weight_scale_inv)
            and first.weight.shape[1] == second.weight.shape[1] and first.pow2 == second.pow2)


def small_m_linear_fp8_pair(x: Tensor, first, second, tiles: Fp8GemvTiles = Fp8GemvTiles()) -> tuple[Tensor, Tensor]:
    """(first(x), second(x)) for two FP8InferenceLinears over the same x [M, K] in one launch (gemv.py's pair for
    e4m3 weights: the second matrix pays no launch and tail of its own; with prequant, x is quantised once
    for both).  The tiles' split_k is not used: a pair runs without split."""
    _check(tiles)
    assert first.weight.shape[1] == second.weight.shape[1], "a pair shares its input: one padded K"
    mma = x.shape[0] > FMA_MAX_ROWS if tiles.mma is None else tiles.mma
    x = x.contiguous()
    xq, xs = _prepared(x, first.pow2, tiles)
    return _small_m_linear_fp8_pair_op(x, xq, xs, first.weight, first.weight_scale_inv.contiguous(), first.out_features,
                                       second.weight, second.weight_scale_inv.contiguous(), second.out_features,
                                       first.pow2, mma, max(tiles.block_n, 16) if mma else tiles.block_n,
                                       tiles.groups, tiles.warps, tiles.stages, tiles.prequant, tiles.weight_only,
                                       tiles.block_dots)


# ------------------------------------------------------------------------------------------ kernel


@_jit
def _fp8_gemv_kernel(X, XS, W, WS, OUT, M, N, K, KP, K_SPLIT, sxm, sxk, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, POW2: tl.constexpr, MMA: tl.constexpr,
                     DOT_BF16: tl.constexpr, EVEN_K: tl.constexpr, PREQ: tl.constexpr, A16: tl.constexpr,
                     A16_BLOCKS: tl.constexpr, PDL: tl.constexpr):
    # grid (cdiv(N, BLOCK_N), SPLIT_K)
    _fp8_gemv_tile(X, XS, W, WS, OUT, M, N, K, KP, K_SPLIT, sxm, sxk, tl.program_id(0), tl.program_id(1), BLOCK_M,
                   BLOCK_N, GROUPS, POW2, MMA, DOT_BF16, EVEN_K, PREQ, A16, A16_BLOCKS, PDL)


@_jit
def _fp8_gemv_pair_kernel(X, XS, W1, WS1, OUT1, N1, W2, WS2, OUT2, N2, TILES1, M, K, KP, sxm, sxk,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, POW2: tl.constexpr,
                          MMA: tl.constexpr, DOT_BF16: tl.constexpr, EVEN_K: tl.constexpr, PREQ: tl.constexpr,
                          A16: tl.constexpr, A16_BLOCKS: tl.constexpr, PDL: tl.constexpr):
    # grid (N1 tiles + N2 tiles,): the first TILES1 programs do x @ w1.T, the rest x @ w2.T (one x, both weights
    # padded to the same Kp; no split)
    pid = tl.program_id(0)
    if pid < TILES1:
        _fp8_gemv_tile(X, XS, W1, WS1, OUT1, M, N1, K, KP, KP, sxm, sxk, pid, 0, BLOCK_M, BLOCK_N, GROUPS, POW2, MMA,
                       DOT_BF16, EVEN_K, PREQ, A16, A16_BLOCKS, PDL)
    else:
        _fp8_gemv_tile(X, XS, W2, WS2, OUT2, M, N2, K, KP, KP, sxm, sxk, pid - TILES1, 0, BLOCK_M, BLOCK_N, GROUPS,
                       POW2, MMA, DOT_BF16, EVEN_K, PREQ, A16, A16_BLOCKS, PDL)


@_jit
def _fp8_gemv_tile(X, XS, W, WS, OUT, M, N, K, KP, K_SPLIT, sxm, sxk, pid_n, pid_k, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, POW2: tl.constexpr, MMA: tl.constexpr,
                   DOT_BF16: tl.constexpr, EVEN_K: tl.constexpr, PREQ: tl.constexpr, A16: tl.constexpr,
                   A16_BLOCKS: tl.constexpr, PDL: tl.constexpr):
    # tile (pid_n, pid_k): OUT[pid_k] [M, N] gets x[:, split] @ dequant(W)[tile, split].T over the
    # K_SPLIT columns (whole GROUPS * 128 steps) from pid_k * K_SPLIT; the last split may run past Kp (masked
    # by whole blocks: EVEN_K is False then).  W rows past N are zero padding (the weight is [Np, Kp]), so
    # only the store is masked along N, and x's columns past K load as zeros (its 1x128 tiles are zero
    # padded, as reference.quant_rows pads them).  PREQ: X is x already quantised, e4m3 [M, K], with its scales
    # XS [M, K / 128] at strides (sxm, sxk).  The fma form scales each block's products before summing them
    # and reduces over K once, after the loop ([BLOCK_M, BLOCK_N, 128] accumulator): no cross-lane sum per block.
    # A16 (weight only): x stays as loaded; on the tensor cores one dot per step as gemv.py's, x^T's columns times
    # their block's weight scale first (rounded once to bf16 on the GPU), the e4m3 weights exact in bf16.  The
    # other tensor-core dots take e4m3 operands as fp16 (exact) and get the scales on their fp32 result; so does
    # A16 with A16_BLOCKS, one dot per block on x in bf16 as loaded against the weights in bf16 (exact).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, 128)
    m_ok = offs_m < M
    k_begin = pid_k * K_SPLIT
    w_row = W + offs_n[:, None] * KP + offs_k[None, :]  # [BLOCK_N, 128] e4m3 at column 0
    ws_row = WS + (pid_n * BLOCK_N // 128) * (KP // 128)  # the tile's row of 128x128 scales
    await_previous_kernel(PDL)
    if MMA:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, 128), dtype=tl.float32)
    for k0 in range(k_begin, k_begin + K_SPLIT, GROUPS * 128):
        if A16 and MMA and not A16_BLOCKS:  # gemv.py's tile: one dot per step; x^T's columns times their scales
            kk = k0 + tl.arange(0, GROUPS * 128)
            k_ok = kk < KP
            w = tl.load(W + offs_n[:, None] * KP + kk[None, :], mask=k_ok[None, :], other=0.0)  # e4m3 [N, G*128]
            w_s = tl.load(ws_row + kk // 128, mask=k_ok, other=0.0)  # [G*128]: each block's scale, 128 times
            x = tl.load(X + offs_m[None, :] * K + kk[:, None], mask=m_ok[None, :] & (kk[:, None] < K),
                        other=0.0).to(tl.float32) * w_s[:, None]  # x^T [G*128, BLOCK_M], scaled
            if DOT_BF16:  # x * scale rounded to bf16 once (BF16 activations' rounding); e4m3 exact in bf16
                acc += tl.dot(w.to(tl.bfloat16), x.to(tl.bfloat16))
            else:
                acc += tl.dot(w.to(tl.float32), x, input_precision="ieee")
        for g in tl.static_range(0 if A16 and MMA and not A16_BLOCKS else GROUPS):
            kb = k0 // 128 + g
            k = kb * 128 + offs_k
            if EVEN_K:
                w = tl.load(w_row + kb * 128)  # e4m3 [BLOCK_N, 128]
                w_s = tl.load(ws_row + kb)
            else:  # a block past Kp: zero weights and scale, so it adds nothing
                w = tl.load(w_row + kb * 128, mask=(k < KP)[None, :], other=0.0)
                w_s = tl.load(ws_row + kb, mask=kb * 128 < KP, other=0.0)
            if MMA:  # (A16 only with A16_BLOCKS: the other form runs above)
                x = tl.load(X + offs_m[None, :] * K + k[:, None], mask=m_ok[None, :] & (k[:, None] < K),
                            other=0.0)  # x^T [128, BLOCK_M]
                if A16:
                    s = 1.0
                    xq = x
                elif PREQ:
                    s = tl.load(XS + offs_m * sxm + kb * sxk, mask=m_ok & (offs_m * 0 + kb * 128 < K), other=0.0)
                    xq = x  # e4m3
                else:
                    xf = x.to(tl.float32)
                    s = _scale(tl.max(tl.abs(xf), axis=0), POW2)  # [BLOCK_M]
                    xq = _quantise(xf, s[None, :], True)  # e4m3
                if DOT_BF16 and A16:  # x as loaded (bf16; fp32 x rounded once), the weights exact in bf16
                    part = tl.dot(w.to(tl.bfloat16), xq.to(tl.bfloat16))
                elif DOT_BF16:  # both operands e4m3, exact in fp16 (one conversion per two values)
                    part = tl.dot(w.to(tl.float16), xq.to(tl.float16))
                else:
                    part = tl.dot(w.to(tl.float32), xq.to(tl.float32), input_precision="ieee")
                acc += part * (s * w_s)
            else:
                x = tl.load(X + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k[None, :] < K),
                            other=0.0).to(tl.float32)  # [BLOCK_M, 128]
                if A16:
                    s = tl.full((BLOCK_M,), 1.0, tl.float32)
                    xq = x
                elif PREQ:
                    s = tl.load(XS + offs_m * sxm + kb * sxk, mask=m_ok & (offs_m * 0 + kb * 128 < K), other=0.0)
                    xq = x
                else:
                    s = _scale(tl.max(tl.abs(x), axis=1), POW2)  # [BLOCK_M]
                    xq = _quantise(x, s[:, None], True).to(tl.float32)
                acc += xq[:, None, :] * w.to(tl.float32)[None, :, :] * (s * w_s)[:, None, None]  # products, scaled
    if not MMA:
        acc = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    out = OUT + pid_k * M * N
    if MMA:
        tl.store(out + offs_m[None, :] * N + offs_n[:, None], acc.to(OUT.dtype.element_ty),
                 mask=m_ok[None, :] & (offs_n[:, None] < N))
    else:
        tl.store(out + offs_m[:, None] * N + offs_n[None, :], acc.to(OUT.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_n[None, :] < N))


# ------------------------------------------------------------------------------------------ the op


@kernel_op("dsv3::small_m_linear_fp8")
def _small_m_linear_fp8_op(x: Tensor, xq: Tensor, xs: Tensor, weight: Tensor, weight_scale_inv: Tensor, out_features: int,
                           pow2: bool, mma: bool, block_n: int, groups: int, warps: int, stages: int, split_k: int,
                           prequant: bool, weight_only: bool, block_dots: bool) -> Tensor:
    # runs with real tensors (launches) and, as its own fake, with fake ones under torch.compile; with prequant
    # the kernel reads xq [M, ceil128(K)] e4m3 and xs, else x itself (xq is x)
    m, k = xq.shape
    blocks = weight.shape[1] // BLOCK
    split_k = min(split_k, blocks)  # every split has at least one block
    groups = min(groups, -(-blocks // split_k))  # no step wider than a split's blocks
    k_split = -(-blocks // (split_k * groups)) * groups * BLOCK  # columns per split, whole steps
    block_m = max(16, 1 << (m - 1).bit_length()) if mma else 1 << (m - 1).bit_length()
    partials = split_k > 1
    out = torch.empty((split_k, m, out_features) if partials else (m, out_features),
                      dtype=torch.float32 if partials else x.dtype, device=x.device)
    launch(_fp8_gemv_kernel, m)[((out_features + block_n - 1) // block_n, split_k)](
        xq, xs, weight, weight_scale_inv, out, m, out_features, k, weight.shape[1], k_split,
        *(xs.stride() if prequant else (0, 0)), BLOCK_M=block_m, BLOCK_N=block_n, GROUPS=groups, POW2=pow2, MMA=mma,
        DOT_BF16=x.is_cuda, EVEN_K=k_split * split_k == weight.shape[1], PREQ=prequant, A16=weight_only,
        A16_BLOCKS=block_dots, num_warps=warps, num_stages=stages)
    return out.sum(0).to(x.dtype) if partials else out


@kernel_op("dsv3::small_m_linear_fp8_pair")
def _small_m_linear_fp8_pair_op(x: Tensor, xq: Tensor, xs: Tensor, w1: Tensor, s1: Tensor, n1: int, w2: Tensor, s2: Tensor,
                                n2: int, pow2: bool, mma: bool, block_n: int, groups: int, warps: int, stages: int,
                                prequant: bool, weight_only: bool, block_dots: bool) -> tuple[Tensor, Tensor]:
    m, k = xq.shape
    kp = w1.shape[1]
    groups = min(groups, kp // BLOCK)
    block_m = max(16, 1 << (m - 1).bit_length()) if mma else 1 << (m - 1).bit_length()
    out1 = torch.empty(m, n1, dtype=x.dtype, device=x.device)
    out2 = torch.empty(m, n2, dtype=x.dtype, device=x.device)
    tiles1 = (n1 + block_n - 1) // block_n
    launch(_fp8_gemv_pair_kernel, m)[(tiles1 + (n2 + block_n - 1) // block_n,)](
        xq, xs, w1, s1, out1, n1, w2, s2, out2, n2, tiles1, m, k, kp, *(xs.stride() if prequant else (0, 0)),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUPS=groups, POW2=pow2, MMA=mma, DOT_BF16=x.is_cuda,
        EVEN_K=kp % (groups * BLOCK) == 0, PREQ=prequant, A16=weight_only, A16_BLOCKS=block_dots, num_warps=warps,
        num_stages=stages)
    return out1, out2
