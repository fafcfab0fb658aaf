"""Triton kernels for FP8 fine-grained training on NVIDIA GPUs (import only where CUDA and Triton exist).

  quant_act      one read of x [M, K] writes both layouts a Linear needs: 1x128 tiles along K (Fprop /
                 Dgrad operand) and 128x1 tiles along M stored transposed [K, M] (Wgrad operand).
                 Optionally the rows are gathered (x[src]) and scaled as they are read: the MoE's
                 dispatch permutation, and in backward its gates, never written in BF16.  QUANT_GLUON
                 (on): both layouts through gluon_quant.py on Hopper and newer (faster, same bytes).
  swiglu_quant   the same two layouts of silu(gate) * up, computed from h = [gate, up] as it is read
                 (the SwiGLU between the expert GEMMs).  Its backward: grouped_gemm_swiglu_backward,
                 on Hopper in the epilogue of the Dgrad that produces da (SWIGLU_BWD_GLUON).
  quant_weight   128x128 blocks of an fp32 master weight [G?, N, K], written as W and as W^T (Dgrad).
  gemm           C = A B^T for A with 1x128 scales and B with 128x128 (or 1x128) scales, rows of A
                 optionally grouped by expert with one B per group: the dense and the grouped (MoE)
                 Fprop/Dgrad.  Each 128-deep tl.dot accumulates in fp32 and is multiplied by
                 a_s * b_s into an fp32 accumulator: the report's promotion every 128 K-elements.
                 torch 2.11 has no block-wise grouped FP8 GEMM, hence this kernel.  GEMM_GLUON (on):
                 the grouped case on Hopper through gluon_gemm.py instead (promotion overlapped, faster).
  wgrad          per group g, C[g] = A^T B over the rows (tokens) of group g, with 1x128 scales along
                 the token dim for both operands: the grouped (and dense, G = 1) weight gradient.
                 WGRAD_GLUON (on): the grouped case on Hopper through gluon_gemm.py.

Layouts and padding follow `reference.py` (every dim a multiple of 128, 1x128 scales column-major);
each kernel there has its pure-torch twin, and tests/test_fp8.py holds them equal on the GPU.  Tile
sizes are fixed (no autotuning: it costs compile time on every new machine).  The grouped tile
schedule is computed in the kernel from the per-expert counts, so no host sync is needed.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import BLOCK, ceil128

FP8_MAX = tl.constexpr(448.0)  # globals a @triton.jit function reads must be constexpr
AMAX_EPS = tl.constexpr(1e-12)


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    s = tl.math.div_rn(tl.maximum(amax, AMAX_EPS), FP8_MAX)  # IEEE division: the same scale as torch's
    if POW2:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    return s


@triton.jit
def _quantise(x, s, RECIP: tl.constexpr):
    """x / s rounded to e4m3.  RECIP (the default, reference.py's maths): x times the rounded reciprocal
    of s.  Else an IEEE division per element, which kept the kernel at ~1 TB/s (2.6x slower at the
    bench step's shapes, bench/fp8_quant_kernel.py); it may differ from RECIP in the e4m3 rounding of
    values within an fp32 ulp of a boundary."""
    if RECIP:
        return (x * tl.math.div_rn(1.0, s)).to(tl.float8e4nv)
    return tl.math.div_rn(x, s).to(tl.float8e4nv)


@triton.jit
def _quant_tile(x, pid_m, col_blk, M, Q, S, QT, ST, sqm, ssm, ssk, sqtk, sstk, sstm,
                ROWS: tl.constexpr, COLS: tl.constexpr, POW2: tl.constexpr, B: tl.constexpr, EVEN_M: tl.constexpr,
                RECIP: tl.constexpr):
    """x [B(m), B(k)] fp32, rows pid_m * B.. and columns col_blk * B.. of the operand (rows past M hold
    zeros): its 1x128 tiles into Q [M, Kp] / S, and its 128x1 tiles transposed into QT [Kp, Mp] / ST."""
    offs_m = pid_m * B + tl.arange(0, B)
    offs_k = col_blk * B + tl.arange(0, B)
    m_ok = offs_m < M
    if ROWS:  # one scale per (row, 128 columns)
        s = _scale(tl.max(tl.abs(x), axis=1), POW2)  # [B(m)]
        q = _quantise(x, s[:, None], RECIP)
        if EVEN_M:
            tl.store(Q + offs_m[:, None].to(tl.int64) * sqm + offs_k[None, :], q)
            tl.store(S + offs_m * ssm + col_blk * ssk, s)
        else:
            tl.store(Q + offs_m[:, None].to(tl.int64) * sqm + offs_k[None, :], q, mask=m_ok[:, None])
            tl.store(S + offs_m * ssm + col_blk * ssk, s, mask=m_ok)
    if COLS:  # one scale per (column, 128 rows), written transposed: QT [Kp, Mp]
        st = _scale(tl.max(tl.abs(x), axis=0), POW2)  # [B(k)]
        qt = tl.trans(_quantise(x, st[None, :], RECIP))  # [B(k), B(m)]
        tl.store(QT + offs_k[:, None].to(tl.int64) * sqtk + offs_m[None, :], qt)
        tl.store(ST + offs_k * sstk + pid_m * sstm, st)


@triton.jit
def _load_rows(ptrs, offs_m, M, EVEN_M: tl.constexpr):
    """A tile as fp32, rows past M as zeros."""
    if EVEN_M:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=offs_m[:, None] < M, other=0.0).to(tl.float32)


@triton.jit
def _operand(X, IDX, MUL, offs_m, offs_k, M, K, sxm, sxk, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
             GATHER: tl.constexpr, ROW_MUL: tl.constexpr, SWIGLU: tl.constexpr):
    """Rows offs_m, columns offs_k of the operand, fp32 (rows past M, columns past K zero).  Row r is
    X[IDX[r]] if GATHER (else X[r]), times MUL[r] if ROW_MUL.  SWIGLU: X = h = [gate, up] with K columns
    each (K % 128 == 0), and the operand is silu(gate) * up rounded to X's dtype (reference.swiglu)."""
    if SWIGLU:
        g_ptrs = X + offs_m[:, None].to(tl.int64) * sxm + offs_k[None, :]  # up's: K columns on
        g = _load_rows(g_ptrs, offs_m, M, EVEN_M)
        u = _load_rows(g_ptrs + K, offs_m, M, EVEN_M)
        return (g * tl.sigmoid(g) * u).to(X.dtype.element_ty).to(tl.float32)
    m_ok = offs_m < M
    if GATHER:
        src = tl.load(IDX + offs_m, mask=m_ok, other=0).to(tl.int64)
    else:
        src = offs_m.to(tl.int64)
    x_ptrs = X + src[:, None] * sxm + offs_k[None, :] * sxk
    # masks only where the shape needs them: a mask along K (the contiguous dim) stays a wide load only
    # if Triton can prove it constant over each vector (K's divisibility, from its argument
    # specialisation); Wgrad's loaded bounds could not be proved and fell to byte loads.  Without
    # the mask nothing rests on that.  A row mask is constant along K.  (Effect on speed unmeasured.)
    if EVEN_K:
        x = _load_rows(x_ptrs, offs_m, M, EVEN_M)
    else:
        x = tl.load(x_ptrs, mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
    if ROW_MUL:
        x = x * tl.load(MUL + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    return x


@triton.jit
def _quant_act_kernel(X, IDX, MUL, Q, S, QT, ST, M, K, sxm, sxk, sqm, ssm, ssk, sqtk, sstk, sstm,
                      ROWS: tl.constexpr, COLS: tl.constexpr, POW2: tl.constexpr, B: tl.constexpr,
                      EVEN_M: tl.constexpr, EVEN_K: tl.constexpr, RECIP: tl.constexpr,
                      GATHER: tl.constexpr, ROW_MUL: tl.constexpr, SWIGLU: tl.constexpr):
    """One 128x128 tile of the operand (_operand) per program, held in registers: both layouts."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * B + tl.arange(0, B)
    offs_k = pid_k * B + tl.arange(0, B)
    x = _operand(X, IDX, MUL, offs_m, offs_k, M, K, sxm, sxk, EVEN_M, EVEN_K, GATHER, ROW_MUL, SWIGLU)
    _quant_tile(x, pid_m, pid_k, M, Q, S, QT, ST, sqm, ssm, ssk, sqtk, sstk, sstm, ROWS, COLS, POW2, B, EVEN_M, RECIP)


@triton.jit
def _quant_weight_kernel(W, Q, S, QT, N, K, swg, swn, swk, sqg, sqn, ssg, ssn, ssk, sqtg, sqtk, B: tl.constexpr,
                         EVEN: tl.constexpr):
    g = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * B + tl.arange(0, B)
    offs_k = pid_k * B + tl.arange(0, B)
    w_ptrs = W + g.to(tl.int64) * swg + offs_n[:, None] * swn + offs_k[None, :] * swk
    if EVEN:  # N and K multiples of 128: no mask (see _quant_act_kernel)
        w = tl.load(w_ptrs).to(tl.float32)
    else:
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), AMAX_EPS), FP8_MAX)
    q = tl.math.div_rn(w, s).to(tl.float8e4nv)
    tl.store(Q + g.to(tl.int64) * sqg + offs_n[:, None] * sqn + offs_k[None, :], q)
    tl.store(QT + g.to(tl.int64) * sqtg + offs_k[:, None] * sqtk + offs_n[None, :], tl.trans(q))
    tl.store(S + g * ssg + pid_n * ssn + pid_k * ssk, s)


@triton.jit
def _gemm_kernel(A, AS, Bw, BS, C, COUNTS, ROWMAP, M, N, K,
                 sam, sak, sasm, sask, sbg, sbn, sbk, sbsg, sbsn, sbsk, scm, scn,
                 G: tl.constexpr, G_P2: tl.constexpr, GROUPED: tl.constexpr, B_ROW_SCALES: tl.constexpr,
                 EVEN_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MAP_ROWS: tl.constexpr):
    """MAP_ROWS: row r of the product is stored as row ROWMAP[r] of C."""
    # N tiles vary fastest: programs running together share one row tile of A (read from HBM once) and
    # one expert's B, which fits in L2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    if GROUPED:
        # tile schedule from the counts: group g owns ceil(counts[g] / BM) consecutive row tiles
        gi = tl.arange(0, G_P2)
        cnt = tl.load(COUNTS + gi, mask=gi < G, other=0).to(tl.int32)
        tiles = (cnt + BM - 1) // BM
        tile_end = tl.cumsum(tiles, axis=0)
        row_end = tl.cumsum(cnt, axis=0)
        g = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
        if g >= G:
            return
        sel = gi == g
        first_tile = tl.sum(tl.where(sel, tile_end - tiles, 0), axis=0)
        row_lim = tl.sum(tl.where(sel, row_end, 0), axis=0)
        row0 = row_lim - tl.sum(tl.where(sel, cnt, 0), axis=0) + (pid_m - first_tile) * BM
        g = g.to(tl.int64)
    else:
        g = 0
        row0 = pid_m * BM
        row_lim = M
    offs_m = row0 + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < row_lim
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * sam + offs_k[None, :] * sak
    b_ptrs = Bw + g * sbg + offs_n[None, :].to(tl.int64) * sbn + offs_k[:, None] * sbk  # [BK, BN]
    as_ptrs = AS + offs_m * sasm
    if B_ROW_SCALES:
        bs_ptrs = BS + g * sbsg + offs_n * sbsn
    else:  # one scale per 128 rows of B: a tile of BN > 128 spans several
        bs_ptrs = BS + g * sbsg + (offs_n // 128) * sbsn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, K // BK):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        a_s = tl.load(as_ptrs + kb * sask, mask=m_ok, other=0.0)
        if EVEN_N:
            b = tl.load(b_ptrs)
            b_s = tl.load(bs_ptrs + kb * sbsk)
        else:
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            b_s = tl.load(bs_ptrs + kb * sbsk, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])  # one 128-deep block in fp32, promoted by one FMA
        a_ptrs += BK * sak
        b_ptrs += BK * sbk
    if MAP_ROWS:
        offs_m = tl.load(ROWMAP + offs_m, mask=m_ok, other=0)
    tl.store(C + offs_m[:, None].to(tl.int64) * scm + offs_n[None, :] * scn, acc.to(C.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wgrad_tile(acc, AT, ATS, BT, BTS, rb, offs_n, offs_k, start, end, san, sar, sasn, sasb, sbk, sbr, sbsk, sbsb,
                BR: tl.constexpr, MASKED: tl.constexpr):
    """acc [BN, BK] += the 128 rows of row tile rb.  Operands are padded to whole tiles (finite e4m3
    everywhere), so every load is in bounds and unmasked; MASKED (a tile shared with another group)
    zeroes the other group's rows of A after the load, which zeroes their products.  A load mask along
    the rows, the contiguous dim here, split the loads into single bytes (576 byte loads at sm_90):
    the edge tiles' share of the time made this kernel 20 % slower on groups not aligned to 128 rows
    (H200, run 15)."""
    offs_r = rb * BR + tl.arange(0, BR)
    a = tl.load(AT + offs_n[:, None].to(tl.int64) * san + offs_r[None, :] * sar)  # [BN, BR]
    b = tl.load(BT + offs_k[None, :].to(tl.int64) * sbk + offs_r[:, None] * sbr)  # [BR, BK]
    if MASKED:
        a = tl.where(((offs_r >= start) & (offs_r < end))[None, :], a, tl.zeros_like(a))
    a_s = tl.load(ATS + offs_n * sasn + rb * sasb)
    b_s = tl.load(BTS + offs_k * sbsk + rb * sbsb)
    return acc + tl.dot(a, b) * a_s[:, None] * b_s[None, :]  # the Wgrad's rounding: (d * a_s) * b_s


@triton.jit
def _wgrad_kernel(AT, ATS, BT, BTS, C, ENDS, M,
                  san, sar, sasn, sasb, sbk, sbr, sbsk, sbsb, scg, scn, sck,
                  GROUPED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    # K tiles vary fastest, then N tiles, then groups: programs running together read one group's rows,
    # which stay in L2 between them
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    if GROUPED:  # group g owns rows [ENDS[g-1], ENDS[g])
        end = tl.load(ENDS + g).to(tl.int32)
        start = tl.load(ENDS + g - 1, mask=g > 0, other=0).to(tl.int32)
    else:
        start = 0
        end = M
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    lo = (start + BR - 1) // BR  # row tiles [lo, hi) lie wholly inside the group
    hi = end // BR
    if end > start:
        if hi < lo:  # the group sits inside one tile
            acc = _wgrad_tile(acc, AT, ATS, BT, BTS, start // BR, offs_n, offs_k, start, end, san, sar, sasn, sasb,
                              sbk, sbr, sbsk, sbsb, BR, True)
        else:
            if start % BR != 0:
                acc = _wgrad_tile(acc, AT, ATS, BT, BTS, start // BR, offs_n, offs_k, start, end, san, sar, sasn, sasb,
                                  sbk, sbr, sbsk, sbsb, BR, True)
            for rb in range(lo, hi):
                acc = _wgrad_tile(acc, AT, ATS, BT, BTS, rb, offs_n, offs_k, start, end, san, sar, sasn, sasb,
                                  sbk, sbr, sbsk, sbsb, BR, False)
            if end % BR != 0:
                acc = _wgrad_tile(acc, AT, ATS, BT, BTS, hi, offs_n, offs_k, start, end, san, sar, sasn, sasb,
                                  sbk, sbr, sbsk, sbsb, BR, True)
    tl.store(C + g.to(tl.int64) * scg + offs_n[:, None] * scn + offs_k[None, :] * sck, acc.to(C.dtype.element_ty))


# ------------------------------------------------------------------------------------------ launchers

GEMM_CFG = dict(BM=128, BN=128, BK=BLOCK, num_warps=8, num_stages=3)
# Tiles measured on an H200 at the bench expert shapes (131072 routed rows, 32 experts, 2026-12-01):
# gemm 128x128 / 8 warps / 3 stages 732 TFLOP/s (w13), ahead of 128x64, 64x128 and any BN=256 tile;
# wgrad 128x64 / 4 warps / 4 stages 531 (128x128 / 8 warps: 512), then 596 once the edge tiles stopped loading
# bytes (61da858, run 15); re-swept in run 16 (2026-12-02): 64x128 / 4 warps / 4 stages 620 / 579 (w13 / w2)
# against 582 / 548 for 128x64
WGRAD_CFG = dict(BN=64, BK=128, BR=BLOCK, num_warps=4, num_stages=4)


@functools.cache
def has_gluon() -> bool:
    """Whether this Triton has the Gluon pieces gluon_gemm.py and gluon_quant.py use (Triton 3.6, torch 2.11,
    and 3.9 do); where it has not, every call takes the Triton kernels."""
    try:
        from . import gluon_gemm, gluon_quant  # noqa: F401
    except (ImportError, AttributeError):  # no Gluon, or one without a builtin the kernels name
        return False
    return True


# the grouped Fprop/Dgrad and Wgrad through gluon_gemm.py where it applies (gluon_gemm.takes, wgrad_takes):
# each block's promotion overlapped with the next block's wgmma, warp-specialised, persistent, bit-identical
# to _gemm_kernel / _wgrad_kernel.  At the bench expert shapes (H200, run 19 at 514e869, TFLOP/s, w13 / w2):
# Fprop 984-1,032 / 855-887 (_gemm_kernel, run 16: 726.7 / 609.7); Wgrad, run 20 at 715bec0, 725-737 / 673-723
# (_wgrad_kernel, run 16: 604.8 / 578.4)
GEMM_GLUON = True
WGRAD_GLUON = True
# SwiGLU's backward in the epilogue of the Dgrad that produces its input (FP8RoutedFn): 894.7 us against the
# GEMM then Inductor's kernel, 1,084.8-1,114.8 us, the same bytes, at the bench experts' shape (H200,
# bench/results/fp8_gemm_swiglu_bwd_2026-12-03_run21_5c001f5.json)
SWIGLU_BWD_GLUON = True
# the dense Fprop/Dgrad (128x128 weight scales) of at least DENSE_GLUON_MIN_ROWS rows through the same Gluon
# kernel as one group where it takes the call: `gemm`, i.e. the Triton backend and the shapes cuBLAS does not
# compute (ops._cublas_takes).  H200, run 22 (two jobs): the Dgrad of wkv_a [576, 2048] (K = 640) at 16,384
# rows 62.0-67.0 us against _gemm_kernel's 115.3-223.5; but at decode's 1 and 8 rows the Gluon kernel took
# 63-187 us against _gemm_kernel's 13-77 for every dense Fprop of the bench model.  Rows between: not measured.
DENSE_GLUON = True
DENSE_GLUON_MIN_ROWS = 4096


def _act_outputs(m: int, kp: int, rows: bool, cols: bool, dev):
    """Empty q [M, Kp], s [M, Kp/128] (col-major), qt [Kp, Mp], st [Kp, Mp/128] (col-major); None where not asked."""
    mp = ceil128(m)
    q = torch.empty(m, kp, dtype=torch.float8_e4m3fn, device=dev) if rows else None
    s = torch.empty(kp // BLOCK, m, dtype=torch.float32, device=dev).t() if rows else None
    qt = torch.empty(kp, mp, dtype=torch.float8_e4m3fn, device=dev) if cols else None
    st = torch.empty(mp // BLOCK, kp, dtype=torch.float32, device=dev).t() if cols else None
    return q, s, qt, st


# both layouts through gluon_quant.py (no shared-memory transpose) on Hopper and newer: at 8 warps 374.6 us
# against _quant_act_kernel's 387.8 at 131,072 x 2048, 16.1 against 17.1 ms per bench step (4 warps: 19.1),
# the same bytes (H200, bench/results/fp8_quant_kernel_2026-12-03_run18_9c08191.json)
QUANT_GLUON = True
GLUON_QUANT_WARPS = 8
# the same Gluon layout for the SwiGLU quantiser (8 warps: 299.8 against the Triton kernel's 312.6 us at the
# bench experts' 131,072 x 1024) and for the weights' 128x128 blocks (218.0 / 112.8 against 224.0 / 117.2 us for
# the stacked w13 / w2), the same bytes (H200, bench/results/fp8_quant_fused_2026-12-03_run18_6c22d06.json)
SWIGLU_GLUON = True
WEIGHT_GLUON = True


def _gluon_runs(dev: torch.device) -> bool:
    """Whether the Gluon quantisers run on dev: CUDA, compute capability 9.0 or newer, Gluon in this Triton."""
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (9, 0) and has_gluon()


def _launch_quant(operand: torch.Tensor, m: int, k: int, rows: bool, cols: bool, pow2: bool, warps: int, recip: bool,
                  src=None, row_mul=None, swiglu: bool = False, gluon: bool = False):
    """The quantiser over the operand's M x K (see _operand) -> (q, s, qt, st), None where not asked.
    gluon: both layouts by gluon_quant.py where it runs (recip maths; warps as given)."""
    kp, mp = ceil128(k), ceil128(m)
    dev = operand.device
    q, s, qt, st = _act_outputs(m, kp, rows, cols, dev)
    if not m:
        if cols:
            qt.zero_()
        return q, s, qt, st
    dummy = torch.empty(0, device=dev)
    qa, sa = (q, s) if rows else (dummy, dummy.view(0, 1).t())
    qta, sta = (qt, st) if cols else (dummy, dummy.view(0, 1).t())
    args = (operand, dummy if src is None else src, dummy if row_mul is None else row_mul,
            qa, sa, qta, sta, m, k, operand.stride(0), operand.stride(1), kp, sa.stride(0), sa.stride(1),
            mp, sta.stride(0), sta.stride(1))
    flags = dict(POW2=pow2, B=BLOCK, EVEN_M=m % BLOCK == 0, EVEN_K=k % BLOCK == 0, GATHER=src is not None,
                 ROW_MUL=row_mul is not None, num_warps=warps)
    grid = (mp // BLOCK, kp // BLOCK)
    if gluon and rows and cols and recip and _gluon_runs(dev):
        from .gluon_quant import _quant_act_gluon_kernel

        _quant_act_gluon_kernel[grid](*args, SWIGLU=swiglu, **flags)
    else:
        _quant_act_kernel[grid](*args, ROWS=rows, COLS=cols, RECIP=recip, SWIGLU=swiglu, **flags)
    return q, s, qt, st


def quant_act(x: torch.Tensor, rows: bool, cols: bool, pow2: bool = False, warps: int | None = None, recip: bool = True,
              src: torch.Tensor | None = None, row_mul: torch.Tensor | None = None, gluon: bool | None = None):
    """x [M, K] -> (q [M, Kp], s [M, Kp/128] col-major) if rows, + (qt [Kp, Mp], st [Kp, Mp/128] col-major) if cols.
    With src [M'] the operand is x[src] (M' rows), gathered as it is read; with row_mul [M'] (fp32) each
    row is multiplied by it first (reference.gathered).  gluon (default QUANT_GLUON): both layouts through
    gluon_quant.py on Hopper and newer (the same bytes), at GLUON_QUANT_WARPS unless warps is given.
    warps and recip (see _quantise): the defaults are the best of bench/fp8_quant_kernel.py's sweep on an
    H200 (commit 66d30de): 16.6 ms per bench training step against 42.6 ms for 8 warps with division;
    a copy of the same bytes takes 10.8 ms.  At 4 warps the kernel needs 238 registers (ptxas, sm_90a),
    so two programs share an SM.  Two other forms ran slower and were deleted
    (H200, 131,072 x 2048, against this kernel's 387.8-389.1 us):
      - persistent, prefetching the next tile into registers (one program per SM): 551.7 us at 8 warps,
        724.4 us at 16 (bench/results/fp8_quant_fused_2026-12-03_run17_9d7ed22.json);
      - two passes over 64- or 32-row slices, each read twice (pass 2 from L2), 153 registers at 4 warps:
        400.0 us at best (2 slices, 2 warps), 17.2 ms per step against 16.7
        (bench/results/fp8_quant_kernel_2026-12-03_run18_75108ac.json)."""
    gluon = QUANT_GLUON if gluon is None else gluon
    warps = warps or (GLUON_QUANT_WARPS if gluon and rows and cols else 4)
    m = x.shape[0] if src is None else src.shape[0]
    return _launch_quant(x, m, x.shape[1], rows, cols, pow2, warps, recip, src, row_mul, gluon=gluon)


# warps per 128x128 tile of the fused SwiGLU quantiser: 313 us against 369 (4 warps) and 481 (16) at the
# bench experts' shape, H200 (bench/results/fp8_quant_fused_2026-12-02_run17.json)
SWIGLU_WARPS = 8


def swiglu_takes(h: torch.Tensor) -> bool:
    """The fused SwiGLU quantiser's shapes: gate and up each a whole number of 128-column tiles."""
    return h.shape[1] % (2 * BLOCK) == 0 and h.stride(1) == 1


def swiglu_quant(h: torch.Tensor, pow2: bool = False, warps: int | None = None, gluon: bool | None = None):
    """h [M, 2I] (gate, up; I % 128 == 0) -> quant_act's four outputs of silu(gate) * up [M, I] (reference.swiglu),
    computed as h is read (_operand with SWIGLU); gluon (default SWIGLU_GLUON): through gluon_quant.py."""
    gluon = SWIGLU_GLUON if gluon is None else gluon
    warps = warps or (GLUON_QUANT_WARPS if gluon else SWIGLU_WARPS)
    return _launch_quant(h, h.shape[0], h.shape[1] // 2, True, True, pow2, warps, True, swiglu=True, gluon=gluon)


def quant_weight(w: torch.Tensor, gluon: bool | None = None):
    """w [G?, N, K] (fp32 master) -> q [G?, Np, Kp], s [G?, Np/128, Kp/128], qt [G?, Kp, Np]; gluon (default
    WEIGHT_GLUON): through gluon_quant.py where it runs (the same bytes)."""
    w3 = w.unsqueeze(0) if w.dim() == 2 else w
    g, n, k = w3.shape
    np_, kp = ceil128(n), ceil128(k)
    q = torch.empty(g, np_, kp, dtype=torch.float8_e4m3fn, device=w.device)
    qt = torch.empty(g, kp, np_, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(g, np_ // BLOCK, kp // BLOCK, dtype=torch.float32, device=w.device)
    kernel = _quant_weight_kernel
    if (WEIGHT_GLUON if gluon is None else gluon) and _gluon_runs(w.device):
        from .gluon_quant import _quant_weight_gluon_kernel as kernel
    kernel[(g, np_ // BLOCK, kp // BLOCK)](
        w3, q, s, qt, n, k, w3.stride(0), w3.stride(1), w3.stride(2), q.stride(0), q.stride(1),
        s.stride(0), s.stride(1), s.stride(2), qt.stride(0), qt.stride(1), B=BLOCK, EVEN=n % BLOCK == 0 and k % BLOCK == 0,
        num_warps=8)
    if w.dim() == 2:
        return q[0], s[0], qt[0]
    return q, s, qt


def _launch_gemm(a, a_s, b3, b_s3, counts, out, row_scales: bool, out_rows=None):
    m, k = a.shape
    g, n = b3.shape[0], b3.shape[1]
    c = GEMM_CFG
    grouped = counts is not None
    tiles_m = triton.cdiv(m, c["BM"]) + (g if grouped else 0)
    if m == 0:
        return out
    if GEMM_GLUON and (grouped or (DENSE_GLUON and m >= DENSE_GLUON_MIN_ROWS)) and has_gluon():
        from . import gluon_gemm

        if gluon_gemm.takes(a, b3, b_s3, row_scales):
            groups = counts if grouped else torch.full((1, ), m, dtype=torch.int64, device=a.device)  # one group of M rows
            return gluon_gemm.grouped_gemm(a, a_s, b3, b_s3, groups, out, out_rows)
    _gemm_kernel[(triton.cdiv(n, c["BN"]), tiles_m)](
        a, a_s, b3, b_s3, out, counts if grouped else a_s, a_s if out_rows is None else out_rows, m, n, k,
        a.stride(0), a.stride(1), a_s.stride(0), a_s.stride(1), b3.stride(0), b3.stride(1), b3.stride(2),
        b_s3.stride(0), b_s3.stride(1), b_s3.stride(2), out.stride(0), out.stride(1),
        G=g, G_P2=triton.next_power_of_2(g), GROUPED=grouped, B_ROW_SCALES=row_scales, EVEN_N=n % c["BN"] == 0,
        BM=c["BM"], BN=c["BN"], BK=c["BK"], MAP_ROWS=out_rows is not None, num_warps=c["num_warps"],
        num_stages=c["num_stages"])
    return out


def gemm(a, a_s, b, b_s, out_dtype):
    """a [M, Kp] (1x128 scales) x b [N, Kp] (128x128 scales [N/128, Kp/128] or 1x128 scales [N, Kp/128]) -> [M, N]."""
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    return _launch_gemm(a, a_s, b.unsqueeze(0), b_s.unsqueeze(0), None, out, row_scales=b_s.shape[0] == b.shape[0])


def grouped_gemm(a, a_s, b, b_s, counts, out_dtype, out_rows=None):
    """a [M, Kp] rows grouped by counts [G]; b [G, N, Kp] with 128x128 scales [G, N/128, Kp/128] -> [M, N];
    with out_rows [M] (a permutation), product row r is output row out_rows[r]."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    return _launch_gemm(a, a_s, b, b_s, counts, out, row_scales=False, out_rows=out_rows)


def grouped_gemm_swiglu_backward(a, a_s, b, b_s, counts, h):
    """ops.grouped_gemm_swiglu_backward: a [M, Kp] x b [G, I, Kp] grouped by counts -> da [M, I], with h
    [M, 2I] -> dh [M, 2I] (reference.swiglu_backward).  SWIGLU_BWD_GLUON: one Gluon kernel where gluon_gemm
    takes the GEMM (dh computed in the Dgrad's epilogue, da never written); else the GEMM, then torch."""
    inter = h.shape[1] // 2
    if SWIGLU_BWD_GLUON and GEMM_GLUON and has_gluon() and b.shape[1] == inter and h.stride(1) == 1:
        from . import gluon_gemm

        if gluon_gemm.takes(a, b, b_s, False):
            dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            return gluon_gemm.grouped_gemm(a, a_s, b, b_s, counts, dh, swiglu_h=h)
    from .reference import swiglu_backward

    return swiglu_backward(h, grouped_gemm(a, a_s, b, b_s, counts, h.dtype)[:, :inter])


def grouped_wgrad(at, at_s, bt, bt_s, counts, out_dtype):
    """at [N, Mp], bt [K, Mp] with 1x128 scales along M; counts [G] -> [G, N, K] (G = 1, counts None: dense)."""
    n, mp = at.shape
    k = bt.shape[0]
    g = 1 if counts is None else counts.numel()
    out = torch.empty(g, n, k, dtype=out_dtype, device=at.device)
    c = WGRAD_CFG
    ends = counts.cumsum(0) if counts is not None else at_s  # on the device: no host sync
    if WGRAD_GLUON and has_gluon():
        from . import gluon_gemm

        if gluon_gemm.wgrad_takes(at, bt, bt_s, counts):
            return gluon_gemm.grouped_wgrad(at, at_s, bt, bt_s, ends, out)
    _wgrad_kernel[(k // c["BK"], n // c["BN"], g)](
        at, at_s, bt, bt_s, out, ends, mp,
        at.stride(0), at.stride(1), at_s.stride(0), at_s.stride(1), bt.stride(0), bt.stride(1),
        bt_s.stride(0), bt_s.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GROUPED=counts is not None, BN=c["BN"], BK=c["BK"], BR=c["BR"], num_warps=c["num_warps"], num_stages=c["num_stages"])
    return out
