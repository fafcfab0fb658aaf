"""The FP8 activation quantiser in Gluon (Triton's explicit-layout dialect): `kernels._quant_act_kernel`'s
maths and outputs (1x128 tiles, and 128x1 tiles stored transposed), with a register layout chosen so that
the transposed tiles need no shared memory.

Why: in the Triton kernel, the 128x1 tiles leave through a layout conversion in shared memory, 128 one-byte
shared loads per thread (`ld.shared.b8` in its PTX).  Writing only the 128x1 tiles takes 13.9 ms per bench
step, against 9.4 ms for only the 1x128 tiles, the same bytes (bench/results/README.md, FP8 run 18).

Here each thread holds 4 rows x 8 columns of the tile per repeat, the lanes of a warp 8 x 4 of those, the
warps stacked along rows (then along columns).  Its 8 columns of a row are 16 contiguous bytes of x (one
vector load) and 8 of Q (one 8-byte store).  Its 4 rows of a column are 4 contiguous bytes of QT, stored
after a register-only change of layout order.  Each store instruction of a warp then fills whole 32-byte
sectors: 8 rows x 32 bytes of Q, 4 rows x 32 bytes of QT.  The amaxes reduce within threads, then
across lanes, and only the column amax crosses warps (through shared memory, 512 bytes).

Scope: the forms `quant_act` takes (plain, gathered rows, rows times a factor) with both layouts; not
SwiGLU.  Equal to the Triton kernel byte for byte (GPU test).  On by default (`kernels.QUANT_GLUON`,
Hopper and newer).  Measured on an H200 (bench/results/README.md, FP8 run 18), at 8 warps (125 registers)
against the Triton kernel at its best 4 warps:
  - 131,072 x 2048: 374.6 against 387.8 us; the fused gather 364.3 against 386.0, gather x gates 369.8
    against 398.8; a copy of the same bytes takes 259.1;
  - every shape of a bench step: 16.1 against 17.1 ms per step (at 4 warps, 239 registers: 19.1)."""

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


@gluon.jit
def _quant_act_gluon_kernel(X, IDX, MUL, Q, S, QT, ST, M, K, sxm, sxk, sqm, ssm, ssk, sqtk, sstk, sstm,
                            POW2: gl.constexpr, B: gl.constexpr, EVEN_M: gl.constexpr, EVEN_K: gl.constexpr,
                            GATHER: gl.constexpr, ROW_MUL: gl.constexpr, num_warps: gl.constexpr):
    """One B x B tile of the operand (row r = X[IDX[r]] if GATHER, times MUL[r] if ROW_MUL) per program:
    its 1x128 tiles into Q [M, Kp] / S, its 128x1 tiles transposed into QT [Kp, Mp] / ST."""
    # rows fastest in registers for QT; columns fastest for the load and Q.  Same lanes and warps.
    rows_l: gl.constexpr = gl.BlockedLayout([4, 8], [8, 4], [4, num_warps // 4], [1, 0])
    cols_l: gl.constexpr = gl.BlockedLayout([4, 8], [8, 4], [4, num_warps // 4], [0, 1])
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
    if EVEN_M and EVEN_K:
        x = gl.load(x_ptrs).to(gl.float32)
    elif EVEN_K:
        x = gl.load(x_ptrs, mask=gl.expand_dims(m_ok, 1), other=0.0).to(gl.float32)
    else:
        x = gl.load(x_ptrs, mask=gl.expand_dims(m_ok, 1) & gl.expand_dims(offs_k < K, 0), other=0.0).to(gl.float32)
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
    qt = gl.convert_layout((x * gl.expand_dims(gl.div_rn(1.0, st), 0)).to(gl.float8e4nv), cols_l)
    tm = pid_m * B + gl.arange(0, B, layout=gl.SliceLayout(1, cols_l))
    tk = pid_k * B + gl.arange(0, B, layout=gl.SliceLayout(0, cols_l))
    gl.store(QT + gl.expand_dims(tk.to(gl.int64) * sqtk, 0) + gl.expand_dims(tm, 1), qt)
    gl.store(ST + offs_k * sstk + pid_m * sstm, st)
