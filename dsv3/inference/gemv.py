"""`F.linear(x, w)` for a few rows of x (decode at batch 1-8): one Triton kernel bound by the weight read.

At batch 1 the dense projections (wq_a, wq_b, wkv_a, wo, the dense layer's MLP, the head) are GEMVs;
cuBLAS runs them as nvjet GEMM tiles at well under 2 TB/s (3-8 us each for 2-34 MB).  Here each program
owns BLOCK_N output features, streams their weight rows over K in BLOCK_K steps once, and multiplies
them by every row of x in the same pass, so the weights are read once for all M <= 8 rows:

  plain     grid (N tiles,): the program's fp32 sum is the output, written in x's dtype.
  split-K   grid (N tiles, SPLIT_K): shapes with few N tiles (wkv_a: 576 features) get SPLIT_K times
            more programs; each writes an fp32 partial [SPLIT_K, M, N] and torch sums them in a fixed
            order (no atomics: deterministic, and CUDA-graph replays are bit-equal).

Two ways to do the products, a compile-time choice (`GemvTiles.mma`):
  fma   fp32 FMAs into a [BLOCK_M, BLOCK_N, BLOCK_K] accumulator reduced over K once, after the loop
        (as moe_small.py's kernels, 3.3 TB/s at batch 1); its registers grow with M.
  mma   tensor cores: tl.dot(w tile [BLOCK_N, BLOCK_K], x^T [BLOCK_K, 16]), the rows of x padded to 16
        with zeros (tl.dot's least size; the wasted products are free in a memory-bound kernel), which
        is what cuBLAS's swap-AB nvjet tiles do; cost independent of M.
Either way the products are exact in fp32 and summed in fp32; the one rounding is the output's.

Tiles are arguments (`GemvTiles`), swept by bench/gemv_kernel.py; they are not autotuned (compile time).
M, N and K are run-time arguments, so one compiled kernel serves every shape.

On by default since the H200 sweep (bench/gemv_kernel.py against F.linear; bench/decode.py's `gemv`
section times decoding with it off, in the same job as the default): `decode_linear` is what the decode step applies its dense projections
with (wq_a, wq_b, wkv_a, wo, the dense and unfused shared MLPs, the head), and it takes this kernel only
while `TRITON_GEMV` is set.  The op is a `torch.library.triton_op`, so `torch.compile(fullgraph=True)`
traces into the launch and a captured decode step replays it.  Its twin is `F.linear` itself.  Not here: FP8 weights,
bias, x with more than two dims.  Written by hand because cuBLAS's batch-1 GEMVs leave half the
bandwidth unused and no library offers a few-row GEMV as a traceable op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..fp8.inference import FP8InferenceLinear
from . import gemv_fp8
from .gemv_fp8 import small_m_linear_fp8, use_small_m_linear_fp8
from .triton_ops import await_previous_kernel, kernel_op, launch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only torch builds ship without Triton; there F.linear is the only path

    def _jit(fn):
        return fn


MAX_ROWS = 8  # the rows of x this kernel is built for (decode batch); the fma accumulator grows with M

# Decoding's dense projections through small_m_linear (on: 1.07-1.13x cuBLAS over a step's projections in
# bench/gemv_kernel.py; bench/decode.py's `gemv` section times a decode with it flipped, end to end).
# Read at trace time: set it before the first generate.
TRITON_GEMV = True
# Pairs of small projections of one input (wq_a + wkv_a, the shared experts' w1 + w3) in one launch.
# H200, bench/gemv_kernel.py 2026-12-01: wq_a + wkv_a (4.3 M weights) 6.9 us as a pair against 11.6 us
# in two launches; the dense MLP's w1 + w3 (33.6 M) 31.1 us against 26.2 us, so pairs stop at
# PAIR_MAX_WEIGHTS (bandwidth-bound big matrices gain nothing from one launch, and lose its balance).
# End to end (bench/decode.py's `pair` section, commit 53074f1): batch 8 5,554 tok/s with pairs, 5,465
# without.  Read at trace time.
PAIR_GEMV = True
PAIR_MAX_WEIGHTS = 8 * 2**20
# small_m_linear_pair_norm (the residual add and RMSNorm before wq_a + wkv_a, in their launch) on FMA
# tiles: the norm's arithmetic runs on the x tile in registers, [M, 512] here, where the tensor-core tiles
# pad x to 16 rows and their x^T tile no longer streams through shared memory: with those the pair took
# 98 us per batch-1 step against 43 without the norm (H200, 2026-12-02, bench/decode.py's profile).  FMA
# tiles 4 x 512 matched the tensor cores on wq_a and wkv_a at one and two rows in the gemv_kernel sweep
# (6.22 / 5.22 us against 6.47 / 5.27); their accumulator grows with M, hence NORM_MAX_ROWS (batch 1 and
# its MTP verify step).
NORM_MAX_ROWS = 2


def use_small_m_linear(x: Tensor, w: Tensor) -> bool:
    """The rule `decode_linear` applies (with TRITON_GEMV on): CUDA, BF16 (the tuned dtype), at most
    MAX_ROWS rows of a 2-D x against a contiguous 2-D weight."""
    return (x.is_cuda and x.dtype == w.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] <= MAX_ROWS
            and w.dim() == 2 and w.is_contiguous())


def use_pair(x: Tensor, w1: Tensor, w2: Tensor) -> bool:
    """The rule `decode_linear_pair` applies (with TRITON_GEMV and PAIR_GEMV on): each weight under the
    single-launch rule, both together at most PAIR_MAX_WEIGHTS elements."""
    return (use_small_m_linear(x, w1) and use_small_m_linear(x, w2)
            and w1.numel() + w2.numel() <= PAIR_MAX_WEIGHTS)


def use_pair_norm(x: Tensor, delta: Tensor, norm_weight: Tensor, w1: Tensor, w2: Tensor) -> bool:
    """The rule of `paired_linear_after_norm`: `use_pair`'s at most NORM_MAX_ROWS rows, with delta and the
    norm's weight in x's dtype (the kernel rounds the residual to it, as torch's add does, and the rows
    times the norm's weight, the tensor-core operand)."""
    return (use_pair(x, w1, w2) and x.shape[0] <= NORM_MAX_ROWS and norm_weight.dtype == delta.dtype == x.dtype
            and delta.shape == x.shape)


def decode_linear(linear: nn.Module, x: Tensor, float_out: bool = False) -> Tensor:
    """linear(x), as the decode step applies a projection: with TRITON_GEMV on, a plain bias-free
    nn.Linear over at most MAX_ROWS rows (CUDA, BF16) runs small_m_linear, an FP8InferenceLinear
    gemv_fp8.py's kernel under its rule (FP8_GEMV); anything else (prefill's many rows, CPU) is the
    module's own call.  x [..., K] -> [..., N].  float_out: the result
    as linear(x).float() (x's dtype's values in fp32, as the head's logits are read), which the kernel
    stores itself, so no cast launch follows it."""
    if TRITON_GEMV and type(linear) is nn.Linear and linear.bias is None:
        flat = x.reshape(-1, x.shape[-1])
        if use_small_m_linear(flat, linear.weight):
            y = small_m_linear(flat, linear.weight, float_out=float_out)
            return y.view(*x.shape[:-1], linear.weight.shape[0])
    if type(linear) is FP8InferenceLinear:  # an FP8 checkpoint's e4m3 weight: gemv_fp8.py, while FP8_GEMV is set
        flat = x.reshape(-1, x.shape[-1])
        if use_small_m_linear_fp8(flat, linear.weight, linear.weight_scale_inv):
            y = small_m_linear_fp8(flat, linear.weight, linear.weight_scale_inv, linear.out_features, linear.pow2,
                                   gemv_fp8.decode_tiles())
            y = y.view(*x.shape[:-1], linear.out_features)
            return y.float() if float_out else y
    return linear(x).float() if float_out else linear(x)


def decode_linear_pair(first: nn.Module, second: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(first(x), second(x)) for two projections of one input (wq_a and wkv_a; w1 and w3): with
    TRITON_GEMV and PAIR_GEMV on and both plain bias-free nn.Linears under `use_pair`, one launch of
    small_m_linear_pair (the second small matrix no longer pays its own launch and tail: wkv_a is 2.4 MB,
    ~5 us alone at batch 1); two FP8InferenceLinears under gemv_fp8's rule (FP8_GEMV) in one launch of
    small_m_linear_fp8_pair; else two decode_linear calls."""
    plain = all(type(m) is nn.Linear and m.bias is None for m in (first, second))
    flat = x.reshape(-1, x.shape[-1])
    if TRITON_GEMV and PAIR_GEMV and plain and use_pair(flat, first.weight, second.weight):
        y1, y2 = small_m_linear_pair(flat, first.weight, second.weight)
        return y1.view(*x.shape[:-1], -1), y2.view(*x.shape[:-1], -1)
    fp8 = type(first) is FP8InferenceLinear and type(second) is FP8InferenceLinear  # an FP8 checkpoint's pair
    if (PAIR_GEMV and fp8 and gemv_fp8.use_pair_fp8(flat, first, second)
            and first.weight.numel() + second.weight.numel() <= PAIR_MAX_WEIGHTS):
        y1, y2 = gemv_fp8.small_m_linear_fp8_pair(flat, first, second, gemv_fp8.decode_tiles())
        return y1.view(*x.shape[:-1], -1), y2.view(*x.shape[:-1], -1)
    return decode_linear(first, x), decode_linear(second, x)


def paired_linear(first: nn.Module, second: nn.Module, x: Tensor):
    """A `linear` argument for the model's projection helpers (`MLA.project_q`, `MLP.forward`, which
    take one) that answers `first` and `second` from one decode_linear_pair over x and applies every
    other module through decode_linear.  Only for modules the helper applies to x itself."""
    y1, y2 = decode_linear_pair(first, second, x)

    def linear(module: nn.Module, inp: Tensor) -> Tensor:
        if module is first:
            return y1
        if module is second:
            return y2
        return decode_linear(module, inp)

    return linear


def paired_linear_after_norm(norm: nn.Module, first: nn.Module, second: nn.Module, x: Tensor, delta: Tensor):
    """The residual add and RMSNorm before two projections, in their launch: (linear, r) with r = x + delta
    [..., K] and `linear` answering first and second of norm(r) (as `paired_linear` does) from one
    small_m_linear_pair_norm; None where the kernel does not take them (the caller adds and norms in
    torch): with TRITON_GEMV and PAIR_GEMV on, plain bias-free Linears under `use_pair_norm`."""
    plain = all(type(m) is nn.Linear and m.bias is None for m in (first, second))
    flat, flat_delta = x.reshape(-1, x.shape[-1]), delta.reshape(-1, x.shape[-1])
    if not (TRITON_GEMV and PAIR_GEMV and plain and use_pair_norm(flat, flat_delta, norm.weight, first.weight,
                                                                  second.weight)):
        return None
    y1, y2, r = small_m_linear_pair_norm(flat, flat_delta, norm.weight, norm.eps, first.weight, second.weight,
                                         NORM_TILES)
    lead = x.shape[:-1]

    def linear(module: nn.Module, inp: Tensor) -> Tensor:
        if module is first:
            return y1.view(*lead, -1)
        if module is second:
            return y2.view(*lead, -1)
        return decode_linear(module, inp)

    return linear, r.view(x.shape)


@dataclass(frozen=True)
class GemvTiles:
    """Compile-time choices of the kernel.  Defaults: the best single choice of bench/gemv_kernel.py's
    sweep on an H200 at the bench decode shapes (commit 20e5f04, bench/results/gemv_kernel_2026-12-01.json):
    tensor-core products, 16 output features x 512 columns per step, 2 warps.  Summed over one decode
    step's dense projections (attention, dense layer, head; the shared expert now rides in moe_small)
    it took 276 us at M=1 and 281 us at M=8 against cuBLAS's 306 and 296 us; the FMA kernels were
    faster at M=1 on some shapes (4 x 512) but fell behind from M=4 as their accumulator grows."""

    mma: bool = True  # products on the tensor cores (tl.dot against x^T padded to 16 rows)
    block_n: int = 16  # output features per program (mma: at least 16)
    block_k: int = 512  # columns of x and w per loop step (mma: at least 16)
    warps: int = 2
    stages: int = 3
    split_k: int = 1  # 1: plain; > 1: split-K with fp32 partials summed in torch


NORM_TILES = GemvTiles(mma=False, block_n=4, block_k=512, warps=4, stages=3)  # see NORM_MAX_ROWS


def _check(x: Tensor, w: Tensor, t: GemvTiles) -> None:
    for name, v in (("block_n", t.block_n), ("block_k", t.block_k), ("warps", t.warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"GemvTiles.{name} must be a power of two (Triton block shapes), got {v}")
    if t.split_k < 1 or t.stages < 1:
        raise ValueError(f"GemvTiles.split_k and stages must be >= 1, got {t.split_k} and {t.stages}")
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], f"x [M, K] and w [N, K], got {x.shape}, {w.shape}"
    assert x.dtype == w.dtype, "one dtype for x and w (tl.dot takes equal operand types)"
    assert w.is_contiguous(), "the kernel addresses weight rows by flat offsets"
    assert w.numel() < 2 ** 31, "int32 offsets into w"


def small_m_linear(x: Tensor, w: Tensor, tiles: GemvTiles = GemvTiles(), float_out: bool = False) -> Tensor:
    """x [M, K], w [N, K] (contiguous, x's dtype) -> x @ w.T [M, N] in x's dtype, fp32 accumulation;
    float_out: those same values (rounded to x's dtype) stored as fp32."""
    t = tiles  # spelt out field by field: torch.compile traces attribute reads, not dataclasses.astuple
    _check(x, w, t)
    return _small_m_linear_op(x.contiguous(), w, t.mma, t.block_n, t.block_k, t.warps, t.stages, t.split_k, float_out)


def small_m_linear_pair(x: Tensor, w1: Tensor, w2: Tensor, tiles: GemvTiles = GemvTiles()) -> tuple[Tensor, Tensor]:
    """(x @ w1.T, x @ w2.T) in one launch: x [M, K], w1 [N1, K], w2 [N2, K] as small_m_linear's w (no split-K)."""
    t = tiles
    if t.split_k != 1:
        raise ValueError(f"small_m_linear_pair runs without split-K, got GemvTiles.split_k={t.split_k}")
    _check(x, w1, t)
    _check(x, w2, t)
    return _small_m_linear_pair_op(x.contiguous(), w1, w2, t.mma, t.block_n, t.block_k, t.warps, t.stages)


def small_m_linear_pair_norm(x: Tensor, delta: Tensor | None, norm_weight: Tensor, eps: float, w1: Tensor, w2: Tensor,
                             tiles: GemvTiles = GemvTiles()) -> tuple[Tensor, Tensor, Tensor]:
    """A residual add, an RMSNorm and two projections in one launch: with r = x + delta (x itself without
    delta) and h = rmsnorm(r) * norm_weight, returns (h @ w1.T, h @ w2.T, r).  x, delta [M, K]; the
    norm's rounding differs from `RMSNorm`'s (the weight multiplies x before the product, 1 / rms after
    it), within BF16's."""
    t = tiles
    if t.split_k != 1:
        raise ValueError(f"small_m_linear_pair_norm runs without split-K, got GemvTiles.split_k={t.split_k}")
    _check(x, w1, t)
    _check(x, w2, t)
    assert norm_weight.shape == (x.shape[1],) and (delta is None or delta.shape == x.shape), "norm [K], delta [M, K]"
    return _small_m_linear_pair_norm_op(x.contiguous(), None if delta is None else delta.contiguous(),
                                        norm_weight.contiguous(), float(eps), w1, w2, t.mma, t.block_n, t.block_k,
                                        t.warps, t.stages)


# ------------------------------------------------------------------------------------------ kernel


@_jit
def _gemv_tile(X, W, OUT, M, N, K, K_SPLIT, pid_n, pid_k, DELTA, NW, X_OUT, eps, write_x,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MMA: tl.constexpr,
               EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr = False,
               HAS_DELTA: tl.constexpr = False, ROUND_X: tl.constexpr = False, PDL: tl.constexpr = 0):
    # tile (pid_n, pid_k): OUT[pid_k] [M, N] (row-major; OUT is [SPLIT_K, M, N] fp32 partials, or [M, N]
    # in x's dtype when SPLIT_K = 1, fp32 with ROUND_X) gets x[:, split] @ w[tile, split].T.  K_SPLIT: the columns of one
    # split, a multiple of BLOCK_K; the last split may run past K (masked: EVEN_K is False then).
    # NORM (no split): the rows are the residual stream x (+ DELTA [M, K], rounded to x's dtype as torch's
    # add), RMS-normalised with weight NW [K]: each tile streams its rows over the whole K anyway, so it
    # sums their squares on the way and multiplies by nw before the product, and the rows' 1 / rms scales
    # the sums at the end (the norm commutes with the product).  The program with write_x stores x + delta
    # into X_OUT [M, K], the residual the next layer reads.  ROUND_X: OUT is fp32 and gets the sums rounded
    # to x's dtype first (small_m_linear's float_out: what a cast after the bf16 output would give).
    eps = tl.cast(eps, tl.float32)  # inductor hands a Python float in as fp64: the norm's maths is fp32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid_k * K_SPLIT + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    w_ptrs = W + offs_n[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    await_previous_kernel(PDL)
    if MMA:
        x_offs = offs_m[None, :] * K + offs_k[:, None]  # x^T [BLOCK_K, BLOCK_M]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_offs = offs_m[:, None] * K + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over K once, after the loop
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)  # NORM: each row's sum of squares
    for k0 in range(0, K_SPLIT, BLOCK_K):
        k_ok = offs_k + k0 < K
        if EVEN_N and EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if MMA:
            x_ok = m_ok[None, :] & k_ok[:, None]  # BLOCK_M (16) > M: the padding rows are masked to zero
        else:
            x_ok = m_ok[:, None] & k_ok[None, :]
        if EVEN_M and EVEN_K and not MMA:
            x = tl.load(X + x_offs + k0)
        else:
            x = tl.load(X + x_offs + k0, mask=x_ok, other=0.0)
        if NORM:
            if HAS_DELTA:
                x = (x.to(tl.float32) + tl.load(DELTA + x_offs + k0, mask=x_ok, other=0.0).to(tl.float32)).to(x.dtype)
                if write_x:
                    tl.store(X_OUT + x_offs + k0, x, mask=x_ok)
            xf = x.to(tl.float32)
            nw = tl.load(NW + offs_k + k0, mask=k_ok, other=0.0).to(tl.float32)
            if MMA:
                squares += tl.sum(xf * xf, axis=0)
                x = (xf * nw[:, None]).to(x.dtype)
            else:
                squares += tl.sum(xf * xf, axis=1)
                x = (xf * nw[None, :]).to(x.dtype)
        if MMA:
            acc = tl.dot(w, x, acc, input_precision="ieee")  # ieee: fp32 inputs stay fp32 (no tf32); bf16 ignores it
        else:
            acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
        w_ptrs += BLOCK_K
    out = OUT + pid_k * M * N
    if MMA:
        if NORM:
            acc = acc * tl.rsqrt(squares / K + eps)[None, :]
        if ROUND_X:
            acc = acc.to(X.dtype.element_ty)
        tl.store(out + offs_m[None, :] * N + offs_n[:, None], acc.to(OUT.dtype.element_ty),
                 mask=m_ok[None, :] & n_ok[:, None])
    else:
        y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
        if NORM:
            y = y * tl.rsqrt(squares / K + eps)[:, None]
        if ROUND_X:
            y = y.to(X.dtype.element_ty)
        y = y.to(OUT.dtype.element_ty)
        if EVEN_M and EVEN_N:
            tl.store(out + offs_m[:, None] * N + offs_n[None, :], y)
        else:
            tl.store(out + offs_m[:, None] * N + offs_n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@_jit
def _small_m_linear_kernel(X, W, OUT, M, N, K, K_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, MMA: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                           EVEN_K: tl.constexpr, ROUND_X: tl.constexpr, PDL: tl.constexpr):
    # grid (N tiles, SPLIT_K); the tile waits on the kernel before (PDL)
    _gemv_tile(X, W, OUT, M, N, K, K_SPLIT, tl.program_id(0), tl.program_id(1), X, X, X, 0.0, False, BLOCK_M, BLOCK_N,
               BLOCK_K, MMA, EVEN_M, EVEN_N, EVEN_K, ROUND_X=ROUND_X, PDL=PDL)


@_jit
def _small_m_linear_pair_kernel(X, W1, W2, OUT1, OUT2, M, N1, N2, K, TILES1, DELTA, NW, X_OUT, eps,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MMA: tl.constexpr,
                                EVEN_M: tl.constexpr, EVEN_N1: tl.constexpr, EVEN_N2: tl.constexpr,
                                EVEN_K: tl.constexpr, NORM: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
    # grid (N1 tiles + N2 tiles,): the first TILES1 programs do x @ w1.T, the rest x @ w2.T (no split);
    # with NORM, of rmsnorm(x + delta), program 0 writing x + delta; the tile waits on the kernel before (PDL)
    pid = tl.program_id(0)
    if pid < TILES1:
        _gemv_tile(X, W1, OUT1, M, N1, K, K, pid, 0, DELTA, NW, X_OUT, eps, pid == 0, BLOCK_M, BLOCK_N, BLOCK_K, MMA,
                   EVEN_M, EVEN_N1, EVEN_K, NORM, HAS_DELTA, PDL=PDL)
    else:
        _gemv_tile(X, W2, OUT2, M, N2, K, K, pid - TILES1, 0, DELTA, NW, X_OUT, eps, False, BLOCK_M, BLOCK_N, BLOCK_K,
                   MMA, EVEN_M, EVEN_N2, EVEN_K, NORM, HAS_DELTA, PDL=PDL)


# ------------------------------------------------------------------------------------------ the op


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


@kernel_op("dsv3::small_m_linear")
def _small_m_linear_op(x: Tensor, w: Tensor, mma: bool, block_n: int, block_k: int, warps: int, stages: int,
                       split_k: int, float_out: bool = False) -> Tensor:
    # runs with real tensors (launches) and, as its own fake, with fake ones under torch.compile
    m, k = x.shape
    n = w.shape[0]
    least = 16 if mma else 1  # tl.dot's least block size
    bm = max(least, _pow2_at_least(m))
    # tiles no larger than the (power-of-two rounded) dims: small test shapes stay cheap
    bn = max(least, min(block_n, _pow2_at_least(n)))
    bk = max(least, min(block_k, _pow2_at_least(_cdiv(k, split_k))))
    k_split = _cdiv(k, split_k * bk) * bk  # columns per split, whole BLOCK_K steps
    partials = split_k > 1
    round_x = float_out and not partials and x.dtype != torch.float32
    out = torch.empty((split_k, m, n) if partials else (m, n),
                      dtype=torch.float32 if partials or float_out else x.dtype, device=x.device)
    launch(_small_m_linear_kernel, m)[(_cdiv(n, bn), split_k)](
        x, w, out, m, n, k, k_split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, MMA=mma, EVEN_M=m == bm,
        EVEN_N=n % bn == 0, EVEN_K=k == k_split * split_k, ROUND_X=round_x, num_warps=warps, num_stages=stages)
    if partials:
        out = out.sum(0).to(x.dtype)
        return out.float() if float_out else out
    return out


@kernel_op("dsv3::small_m_linear_pair")
def _small_m_linear_pair_op(x: Tensor, w1: Tensor, w2: Tensor, mma: bool, block_n: int, block_k: int, warps: int,
                            stages: int) -> tuple[Tensor, Tensor]:
    out1, out2, _ = _launch_pair(x, None, None, 0.0, w1, w2, mma, block_n, block_k, warps, stages)
    return out1, out2


@kernel_op("dsv3::small_m_linear_pair_norm")
def _small_m_linear_pair_norm_op(x: Tensor, delta: Tensor | None, norm_weight: Tensor, eps: float, w1: Tensor,
                                 w2: Tensor, mma: bool, block_n: int, block_k: int, warps: int,
                                 stages: int) -> tuple[Tensor, Tensor, Tensor]:
    out1, out2, residual = _launch_pair(x, delta, norm_weight, eps, w1, w2, mma, block_n, block_k, warps, stages)
    return out1, out2, residual if delta is not None else x.clone()  # an op's outputs may not alias its inputs


def _launch_pair(x, delta, norm_weight, eps, w1, w2, mma, block_n, block_k, warps, stages):
    m, k = x.shape
    n1, n2 = w1.shape[0], w2.shape[0]
    least = 16 if mma else 1
    bm = max(least, _pow2_at_least(m))
    bn = max(least, min(block_n, _pow2_at_least(max(n1, n2))))
    bk = max(least, min(block_k, _pow2_at_least(k)))
    out1 = torch.empty(m, n1, dtype=x.dtype, device=x.device)
    out2 = torch.empty(m, n2, dtype=x.dtype, device=x.device)
    norm, has_delta = norm_weight is not None, delta is not None
    residual = torch.empty_like(x) if has_delta else x
    tiles1 = _cdiv(n1, bn)
    launch(_small_m_linear_pair_kernel, m)[(tiles1 + _cdiv(n2, bn),)](
        x, w1, w2, out1, out2, m, n1, n2, k, tiles1, delta if has_delta else x, norm_weight if norm else x, residual,
        eps, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, MMA=mma, EVEN_M=m == bm, EVEN_N1=n1 % bn == 0, EVEN_N2=n2 % bn == 0,
        EVEN_K=k % bk == 0, NORM=norm, HAS_DELTA=has_delta, num_warps=warps, num_stages=stages)
    return out1, out2, residual
