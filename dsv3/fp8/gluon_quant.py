"""The FP8 quantisers in Gluon (Triton's explicit-layout dialect), Hopper and newer: `kernels._quant_act_kernel`
(activations, gathered or gated rows, SwiGLU) and `kernels._quant_weight_kernel` (weights' 128x128 blocks),
the same maths and bytes, with a register layout chosen so that the transposed tiles need no shared memory.

Why: in the Triton kernels the transposed tiles (QT) leave through a layout conversion in shared memory,
128 one-byte shared loads per thread (`ld.shared.b8` in the PTX).  Writing only the 128x1 tiles took 13.9 ms
per bench step, against 9.4 ms for only the 1x128 tiles, the same bytes (bench/results/README.md, FP8 run 18).

Here each thread holds 4 rows x 8 columns of the tile per repeat, the lanes of a warp 8 x 4 of those, the
warps stacked along rows (then along columns).  Its 8 columns of a row are 16 contiguous bytes of x (one
vector load) and 8 of Q (one 8-byte store).  Its 4 rows of a column are 4 contiguous bytes of QT, stored
after a register-only change of layout order.  Each store instruction of a warp then fills whole 32-byte
sectors: 8 rows x 32 bytes of Q, 4 rows x 32 bytes of QT.  The amaxes reduce within threads, then across
lanes; only the column amax crosses warps (shared memory: 2 KB at 4 warps, 4 KB at 8).

On by default (`kernels.QUANT_GLUON`, `SWIGLU_GLUON`, `WEIGHT_GLUON`, at 8 warps); each kernel equals its
Triton twin byte for byte (GPU tests).  Measured on an H200 (bench/results/README.md, FP8 run 18), at 8 warps
(125 registers) against the Triton kernels at their best warps:
  - 131,072 x 2048: 374.6 against 387.8 us; the fused gather 364.3 against 386.0, gather x gates 369.8
    against 398.8; a copy of the same bytes takes 259.1;
  - every activation shape of a bench step: 16.1 against 17.1 ms per step (at 4 warps, 239 registers: 19.1);
  - SwiGLU at 131,072 x 1024: 299.8 against 312.6 us; the weights' blocks 3-7 % faster (the stacked w13:
    218.0 against 224.0 us)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

FP8_MAX = gl.constexpr(448.0)
AMAX_EPS = gl.constexpr(1e-12)


@gluon.jit
def _scale(amax, POW2: gl.constexpr):
    """kernels._scale: amax / 448 (IEEE), optionally rounded up to a power of two."""
    s = gl.div_rn(gl.maximum(amax, AMAX_EPS), FP8_MAX)
    if POW2:
        s = gl.exp2(gl.ceil(gl.log2(s)))
    return s


@gluon.constexpr_function
def _tile_layout(num_warps, rows_fastest):
    """4 x 8 elements per thread and repeat, lanes 8 x 4, warps stacked along rows, then columns.  The
    load and Q use it with a thread's 8 columns consecutive in registers, QT with its 4 rows
    (rows_fastest): the same lanes and warps, so converting between the two moves no data between threads."""
    return gl.BlockedLayout([4, 8], [8, 4], [4, num_warps // 4], [0, 1] if rows_fastest else [1, 0])


@gluon.jit
def _store_transposed(QT, q, r0, c0, sqtk, B: gl.constexpr, cols_l: gl.constexpr):
    """QT[c0 + j, r0 + i] = q[i, j] for a B x B tile q (rows_l): 4 contiguous bytes per thread and column."""
    qt = gl.convert_layout(q, cols_l)
    tr = r0 + gl.arange(0, B, layout=gl.SliceLayout(1, cols_l))
    tc = c0 + gl.arange(0, B, layout=gl.SliceLayout(0, cols_l))
    gl.store(QT + gl.expand_dims(tc.to(gl.int64) * sqtk, 0) + gl.expand_dims(tr, 1), qt)


@gluon.jit
def _load_tile(ptrs, m_ok, k_ok, EVEN_M: gl.constexpr, EVEN_K: gl.constexpr):
    """A tile as fp32, masked rows and columns as zeros (masks only where the shape needs them)."""
    if EVEN_M and EVEN_K:
        return gl.load(ptrs).to(gl.float32)
    if EVEN_K:
        return gl.load(ptrs, mask=gl.expand_dims(m_ok, 1), other=0.0).to(gl.float32)
    return gl.load(ptrs, mask=gl.expand_dims(m_ok, 1) & gl.expand_dims(k_ok, 0), other=0.0).to(gl.float32)


@gluon.jit
def _quant_act_gluon_kernel(X, IDX, MUL, Q, S, QT, ST, M, K, sxm, sxk, sqm, ssm, ssk, sqtk, sstk, sstm,
                            POW2: gl.constexpr, B: gl.constexpr, EVEN_M: gl.constexpr, EVEN_K: gl.constexpr,
                            GATHER: gl.constexpr, ROW_MUL: gl.constexpr, SWIGLU: gl.constexpr,
                            num_warps: gl.constexpr):
    """One B x B tile of the operand per program: its 1x128 tiles into Q [M, Kp] / S, its 128x1 tiles
    transposed into QT [Kp, Mp] / ST.  Operand row r is X[IDX[r]] if GATHER (else X[r]), times MUL[r] if
    ROW_MUL; with SWIGLU, X = h = [gate, up] (K columns each, K % 128 == 0) and the operand is
    silu(gate) * up rounded to X's dtype (kernels._operand, reference.swiglu)."""
    rows_l: gl.constexpr = _tile_layout(num_warps, False)
    cols_l: gl.constexpr = _tile_layout(num_warps, True)
    pid_m = gl.program_id(0)
    pid_k = gl.program_id(1)
    offs_m = pid_m * B + gl.arange(0, B, layout=gl.SliceLayout(1, rows_l))
    offs_k = pid_k * B + gl.arange(0, B, layout=gl.SliceLayout(0, rows_l))
    m_ok = offs_m < M
    if GATHER:
        src = gl.load(IDX + offs_m, mask=m_ok, other=0).to(gl.int64)
    else:
        src = offs_m.to(gl.int64)
    x_ptrs = X + gl.expand_dims(src * sxm, 1) + gl.expand_dims(offs_k * sxk, 0)
    x = _load_tile(x_ptrs, m_ok, offs_k < K, EVEN_M, EVEN_K)
    if SWIGLU:  # x is the gate; up is K columns on
        u = _load_tile(x_ptrs + K, m_ok, offs_k < K, EVEN_M, EVEN_K)
        x = (x * (1 / (1 + gl.exp(-x))) * u).to(X.dtype.element_ty).to(gl.float32)  # tl.sigmoid's formula
    if ROW_MUL:
        x = x * gl.expand_dims(gl.load(MUL + offs_m, mask=m_ok, other=0.0).to(gl.float32), 1)

    ax = gl.abs(x)
    s = _scale(gl.max(ax, axis=1), POW2)  # [B(m)]: one scale per (row, 128 columns)
    q = (x * gl.expand_dims(gl.div_rn(1.0, s), 1)).to(gl.float8e4nv)
    q_ptrs = Q + gl.expand_dims(offs_m.to(gl.int64) * sqm, 1) + gl.expand_dims(offs_k, 0)
    if EVEN_M:
        gl.store(q_ptrs, q)
        gl.store(S + offs_m * ssm + pid_k * ssk, s)
    else:
        gl.store(q_ptrs, q, mask=gl.expand_dims(m_ok, 1))
        gl.store(S + offs_m * ssm + pid_k * ssk, s, mask=m_ok)

    st = _scale(gl.max(ax, axis=0), POW2)  # [B(k)]: one scale per (column, 128 rows)
    _store_transposed(QT, (x * gl.expand_dims(gl.div_rn(1.0, st), 0)).to(gl.float8e4nv), pid_m * B, pid_k * B,
                      sqtk, B, cols_l)
    gl.store(ST + offs_k * sstk + pid_m * sstm, st)


@gluon.jit
def _quant_weight_gluon_kernel(W, Q, S, QT, N, K, swg, swn, swk, sqg, sqn, ssg, ssn, ssk, sqtg, sqtk,
                               B: gl.constexpr, EVEN: gl.constexpr, num_warps: gl.constexpr):
    """kernels._quant_weight_kernel: the 128x128 block (g, pid_n, pid_k) of W [G, N, K] fp32 -> Q [G, Np, Kp],
    one scale S (amax / 448, IEEE), and Q's transpose QT [G, Kp, Np] without a shared-memory transpose."""
    rows_l: gl.constexpr = _tile_layout(num_warps, False)
    cols_l: gl.constexpr = _tile_layout(num_warps, True)
    g = gl.program_id(0)
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    offs_n = pid_n * B + gl.arange(0, B, layout=gl.SliceLayout(1, rows_l))
    offs_k = pid_k * B + gl.arange(0, B, layout=gl.SliceLayout(0, rows_l))
    w_ptrs = W + g.to(gl.int64) * swg + gl.expand_dims(offs_n * swn, 1) + gl.expand_dims(offs_k * swk, 0)
    w = _load_tile(w_ptrs, offs_n < N, offs_k < K, EVEN, EVEN)
    s = gl.div_rn(gl.maximum(gl.max(gl.max(gl.abs(w), axis=1), axis=0), AMAX_EPS), FP8_MAX)
    q = gl.div_rn(w, s).to(gl.float8e4nv)
    gl.store(Q + g.to(gl.int64) * sqg + gl.expand_dims(offs_n * sqn, 1) + gl.expand_dims(offs_k, 0), q)
    _store_transposed(QT + g.to(gl.int64) * sqtg, q, pid_n * B, pid_k * B, sqtk, B, cols_l)
    gl.store(S + g * ssg + pid_n * ssn + pid_k * ssk, s)
