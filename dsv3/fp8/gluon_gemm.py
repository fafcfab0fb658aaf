"""The grouped FP8 GEMMs in Gluon (Triton's explicit-layout dialect), Hopper only: Fprop/Dgrad with the
maths and tile schedule of `kernels._gemm_kernel`, and Wgrad with those of `kernels._wgrad_kernel`, each
with the promotion of one 128-deep block overlapped with the next block's tensor-core work.

Why: in `_gemm_kernel` every 128-deep `tl.dot` is waited on (`wgmma.wait_group 0`) before its fp32
promotion (times the activation and weight scales, added to the accumulator), so the tensor cores idle
during each promotion; Triton 3.6 neither pipelines a dot whose result is consumed in the same iteration
nor warp-specialises this loop on Hopper (bench/results/README.md, FP8 run 15).  The promotion is the
whole gap: a plain Triton FP8 matmul with the same tile and no scales runs the expert shapes at 1,221 /
1,042 TFLOP/s against the scaled kernel's 703 / 609 (bench/fp8_gemm_ceiling.py, run 16).  Here two
wgmma groups stay in flight and each block is promoted while the next runs (`_pipelined`).  A and B arrive
by TMA into STAGES shared-memory slots, each refilled once the wgmma reading it has completed.

Scope: the grouped layouts with 128x128 weight-block scales and 128-multiple N and K (the routed
experts); anything else stays on the Triton kernels.  On by default (`kernels.GEMM_GLUON`,
`kernels.WGRAD_GLUON`): bit-identical to the Triton kernels (GPU tests) and faster at the bench expert
shapes (bench/fp8_kernel_sweep.py, run 16 at c3616f2: Fprop 872.8 / 778.5 TFLOP/s (w13 / w2) against
726.7 / 609.7, Wgrad 614.4 / 585.3 against 604.8 / 578.4).  tests/test_sm90_compile.py checks on any machine with Triton that
the compiled loop really overlaps (the promotion's FMAs between a wgmma's commit and its wait, and no
ptxas serialisation of the wgmmas).

Registers: the accumulator and two 128x128 fp32 product tiles (64 registers each per thread over 8
warps): `ptxas -v` for sm_90a gives 238 (Fprop) and 254 (Wgrad) registers and no spills, so one program
per SM.  Hence the Fprop is persistent: one program per SM walks the tiles, its loads running on into the
next tile, so a tile's first operands do not wait for it to start."""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# 4 stages: Fprop 850.3 / 697.1 TFLOP/s (w13 / w2) before it was persistent, 793.5 / 659.7 at 3; persistent
# 872.8 / 778.5 (5 stages: 869.8 / 783.0).  Wgrad 637.3 / 605.7 against 603.7 / 613.5 at 3 (H200, run 16)
BM, BN, BK, STAGES, WARPS = 128, 128, 128, 4, 8
WGRAD_STAGES = STAGES
PER_SM = 1  # persistent programs per SM


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _scales_ahead(as_ptrs, a_mask, bs_ptrs, rb, sa, sb, COL_SCALES: gl.constexpr):
    """Block rb's scales that are loaded a block before their promotion: A's, one per row of the product
    tile (masked by a_mask, or None) -> [rows, 1]; and B's 128x128 weight-block scale (Fprop/Dgrad).
    Wgrad's B scales, one per column, are loaded later instead (`_col_scales`: 32 registers a set,
    carried round the loop they spill) and stand here as 0."""
    a_s = gl.expand_dims(gl.load(as_ptrs + rb * sa, mask=a_mask, other=None if a_mask is None else 0.0), 1)
    if COL_SCALES:
        b_s = 0.0
    else:
        b_s = gl.load(bs_ptrs + rb * sb)
    return a_s, b_s


@gluon.jit
def _col_scales(b_ahead, bs_ptrs, rb, sb, COL_SCALES: gl.constexpr):
    """The B scales of block rb's promotion.  Wgrad (COL_SCALES): its 128 column scales, [1, cols], loaded
    by the caller just before it waits for the block's wgmma, so that the wait covers their latency (a
    load at the promotion itself put an L2 round trip between every wait and its FMAs).  Fprop/Dgrad:
    b_ahead, the weight-block scale loaded a block ahead."""
    if COL_SCALES:
        return gl.expand_dims(gl.load(bs_ptrs + rb * sb), 0)
    else:
        return b_ahead


@gluon.jit
def _promote(acc, d, a_s, b_s):
    """acc + a block's raw fp32 product d times its scales, as the Triton kernels round it: the scales'
    product first, then one FMA per element, fma(d, a_s * b_s, acc).  Fprop/Dgrad: a_s * b_s is one value
    per row (2 per thread), so the promotion is 64 FFMA per thread and block, where (d * a_s) * b_s took 64
    FMUL more; Wgrad: one FMUL per element for the outer product of the row and column scales."""
    return acc + d * (a_s * b_s)


@gluon.jit
def _load(a_desc, b_desc, a_smem, b_smem, bars, c0, j, n, a_row, b_row, base, n2, a_row2, b_row2, base2):
    """Load number c0 + j of this program (slot (c0 + j) % STAGES): if j < n, block base + j of the current
    tile (columns (base + j) * BK of A's rows a_row.. and B's rows b_row..); else, if j - n < n2, block
    base2 + j - n of the program's next tile (A rows a_row2.., B rows b_row2..); else nothing."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    s = (c0 + j) % STAGES
    here = (j < n).to(gl.int32)
    ok = (j < n) | (j - n < n2)
    a_r = a_row2 + (a_row - a_row2) * here
    b_r = b_row2 + (b_row - b_row2) * here
    col = (base2 + (j - n) + (base - base2 + n) * here) * BLOCK_K
    mbarrier.expect(bars.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(a_desc, [a_r, col], bars.index(s), a_smem.index(s), pred=ok)
    tma.async_copy_global_to_shared(b_desc, [b_r, col], bars.index(s), b_smem.index(s), pred=ok)


@gluon.jit
def _mask_rows(buf, r0, start, end):
    """Zero the columns of the [BN, BR] tile buf that hold rows r0 + i outside [start, end) (another group's
    tokens, for the Wgrad), through registers; fenced, and every warp past it, before a wgmma reads buf."""
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [gl.num_warps(), 1], [1, 0])
    tile = buf.load(layout)
    r = r0 + gl.arange(0, buf.shape[1], layout=gl.SliceLayout(0, layout))
    buf.store(gl.where(gl.expand_dims((r >= start) & (r < end), 0), tile, gl.zeros_like(tile)))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _issue(a_smem, b_smem, bars, c, regs, blk, start, end, EDGES: gl.constexpr):
    """The wgmma of this program's load number c (A [M, K] x B [N, K]^T, overwriting the fp32 tile regs),
    issued async once the load has landed.  EDGES (Wgrad): the load is K block blk, and where it holds rows
    outside [start, end), they are zeroed in shared memory first (at most two blocks per tile)."""
    STAGES: gl.constexpr = a_smem.shape[0]
    s = c % STAGES
    mbarrier.wait(bars.index(s), phase=(c // STAGES) & 1)
    if EDGES:
        r0 = blk * a_smem.shape[2]
        if (r0 < start) | (r0 + a_smem.shape[2] > end):
            _mask_rows(a_smem.index(s), r0, start, end)
    return warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), regs, use_acc=False, is_async=True)


@gluon.jit
def _store(C, acc, r0, c0, r_end, c_end, scr, scc, ROWMAP, MAP_ROWS: gl.constexpr):
    """C[r0 + i, c0 + j] = acc[i, j] for the rows below r_end and the columns below c_end (with MAP_ROWS,
    row ROWMAP[r0 + i] of C).  Through a layout of 16 contiguous bytes per thread: stored straight from
    the wgmma layout, each thread writes 2 elements at a time."""
    out = acc.to(C.dtype.element_ty)
    VEC: gl.constexpr = 128 // C.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
    COLS: gl.constexpr = acc.shape[1] // VEC  # threads along a row (16 or 32 at BN = 128)
    lanes_c: gl.constexpr = 32 if COLS >= 32 else COLS
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // lanes_c, lanes_c], [gl.num_warps(), 1], [1, 0])
    out = gl.convert_layout(out, layout)
    r = r0 + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, layout))
    c = c0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    dest = gl.load(ROWMAP + r, mask=r < r_end, other=0) if MAP_ROWS else r
    ptrs = C + gl.expand_dims(dest.to(gl.int64) * scr, 1) + gl.expand_dims(c * scc, 0)
    gl.store(ptrs, out, mask=gl.expand_dims(r < r_end, 1) & gl.expand_dims(c < c_end, 0))


@gluon.jit
def _pipelined(acc, a_desc, b_desc, a_smem, b_smem, bars, n, a_row, b_row, base, as_ptrs, a_mask, bs_ptrs, sa, sb,
               c0, n2, a_row2, b_row2, base2, start, end, COL_SCALES: gl.constexpr, EDGES: gl.constexpr):
    """acc + the n >= 1 blocks base .. base+n-1, promoted as the Triton kernels round it, fma(d, a_s * b_s, acc),
    with two wgmma groups in flight: block j+1's wgmma is issued before block j is waited on
    (`wait_group 1`), and block j is promoted while j+1 runs, so the tensor cores never drain.

    Two register tiles take turns (xa, xb).  A wgmma in flight crosses the loop's back-edge (xa), and its
    registers must not be copied there: a copy of an in-flight accumulator makes ptxas serialise every
    wgmma (C7514).  So each tile goes round a chain of tied operands only: wait -> promotion reads it ->
    a `wait_group 1` that takes the tile and the new acc (it stalls on nothing, the other group may stay
    outstanding; it pins the promotion before the tile is reused, which LLVM would otherwise sink below
    the next issue and copy the tile for) -> the next wgmma issued into it.  Scales load a block ahead
    (Wgrad's column scales, 32 registers a set, just before the wait for their block: `_col_scales`).

    Loads are counted per program from c0 (this tile's first; the caller loaded the first STAGES, or all
    n if fewer); once block j's wgmma has completed, its slot takes load j + STAGES, which past the
    tile's last block is one of the n2 blocks from base2 of the program's next tile (`_load`), so a
    persistent program does not wait for a tile's first operands.  EDGES: blocks holding rows outside
    [start, end) are masked before their wgmma (`_issue`)."""
    STAGES: gl.constexpr = a_smem.shape[0]
    pa, pb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base, sa, sb, COL_SCALES)  # block j-1's, in the loop
    xb = gl.zeros_like(acc)  # free
    xa = _issue(a_smem, b_smem, bars, c0, gl.zeros_like(acc), base, start, end, EDGES)
    for j in range(1, n - 1, 2):  # blocks j and j+1 issued; j-1 and j promoted
        xb = _issue(a_smem, b_smem, bars, c0 + j, xb, base + j, start, end, EDGES)
        ca, cb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + j, sa, sb, COL_SCALES)
        pbc = _col_scales(pb, bs_ptrs, base + j - 1, sb, COL_SCALES)
        xa, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))  # block j-1 done
        _load(a_desc, b_desc, a_smem, b_smem, bars, c0, j - 1 + STAGES, n, a_row, b_row, base, n2, a_row2,
              b_row2, base2)
        acc = _promote(acc, xa, pa, pbc)
        xa, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))  # pin (stalls on nothing)
        xa = _issue(a_smem, b_smem, bars, c0 + j + 1, xa, base + j + 1, start, end, EDGES)
        pa, pb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + j + 1, sa, sb, COL_SCALES)
        cbc = _col_scales(cb, bs_ptrs, base + j, sb, COL_SCALES)
        xb, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xb, acc))  # block j done
        _load(a_desc, b_desc, a_smem, b_smem, bars, c0, j + STAGES, n, a_row, b_row, base, n2, a_row2, b_row2, base2)
        acc = _promote(acc, xb, ca, cbc)
        xb, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xb, acc))  # pin
    if n % 2 == 0:  # xa holds block n-2; block n-1 not yet issued
        last = _issue(a_smem, b_smem, bars, c0 + n - 1, xb, base + n - 1, start, end, EDGES)
        ca, cb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + n - 1, sa, sb, COL_SCALES)
        d, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))
        pbc = _col_scales(pb, bs_ptrs, base + n - 2, sb, COL_SCALES)  # in the tail after the wait: no spill
        _load(a_desc, b_desc, a_smem, b_smem, bars, c0, n - 2 + STAGES, n, a_row, b_row, base, n2, a_row2, b_row2, base2)
        acc = _promote(acc, d, pa, pbc)
        d, acc = warpgroup_mma_wait(num_outstanding=0, deps=(last, acc))
        cbc = _col_scales(cb, bs_ptrs, base + n - 1, sb, COL_SCALES)
        _load(a_desc, b_desc, a_smem, b_smem, bars, c0, n - 1 + STAGES, n, a_row, b_row, base, n2, a_row2, b_row2, base2)
        acc = _promote(acc, d, ca, cbc)
    else:  # xa holds block n-1
        d, acc = warpgroup_mma_wait(num_outstanding=0, deps=(xa, acc))
        pbc = _col_scales(pb, bs_ptrs, base + n - 1, sb, COL_SCALES)
        _load(a_desc, b_desc, a_smem, b_smem, bars, c0, n - 1 + STAGES, n, a_row, b_row, base, n2, a_row2, b_row2, base2)
        acc = _promote(acc, d, pa, pbc)
    return acc


@gluon.jit
def _tile(t, num_n, gi, cnt, tiles, tile_end, row_end, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Output tile t (N tiles fastest) -> (row0, row_lim, g, pid_n, b_row): group g owns ceil(counts[g] / BM)
    consecutive row tiles, as in _gemm_kernel; rows row0 .. row_lim-1 of A; B's rows from b_row (B viewed as
    [G*N, Kp]).  Past the last tile, g = G."""
    pid_m = t // num_n
    pid_n = t % num_n
    g = gl.sum((tile_end <= pid_m).to(gl.int32), axis=0)
    sel = gi == g
    first_tile = gl.sum(gl.where(sel, tile_end - tiles, 0), axis=0)
    row_lim = gl.sum(gl.where(sel, row_end, 0), axis=0)
    row0 = row_lim - gl.sum(gl.where(sel, cnt, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    return row0, row_lim, g, pid_n, g * N + pid_n * BLOCK_N


@gluon.jit
def _grouped_gemm_kernel(a_desc, AS, b_desc, BS, C, COUNTS, ROWMAP, N, K, sasm, sask, sbsg, sbsn, sbsk, scm, scn,
                         G: gl.constexpr, G_P2: gl.constexpr, STAGES: gl.constexpr, MAP_ROWS: gl.constexpr,
                         num_warps: gl.constexpr):
    """Persistent: program p computes tiles p, p + P, ... (P programs, one per SM); the loads run on from
    one tile into the next (`_pipelined`), so only the first tile waits for its operands.  MAP_ROWS: row r
    of the product is stored as row ROWMAP[r] of C."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)

    # the tile schedule's per-group vectors, once per program
    vec: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    gi = gl.arange(0, G_P2, layout=vec)
    cnt = gl.load(COUNTS + gi, mask=gi < G, other=0).to(gl.int32)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tile_end = gl.associative_scan(tiles, 0, _add)
    row_end = gl.associative_scan(cnt, 0, _add)
    num_n = N // BLOCK_N
    total = gl.sum(tiles, axis=0) * num_n
    n = K // BLOCK_K

    # wgmma m64nNk32 for e4m3, the warps stacked along M
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 32])
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    row0, row_lim, g, pid_n, b_row = _tile(pid, num_n, gi, cnt, tiles, tile_end, row_end, N, BLOCK_M, BLOCK_N)
    for i in gl.static_range(STAGES):  # the first tile's first STAGES blocks (n >= STAGES: gluon_gemm.takes)
        _load(a_desc, b_desc, a_smem, b_smem, bars, 0, i, n * (pid < total).to(gl.int32), row0, b_row, 0, 0, row0,
              b_row, 0)
    c0 = 0
    for t in range(pid, total, nprog):
        row0_2, row_lim_2, g_2, pid_n_2, b_row_2 = _tile(t + nprog, num_n, gi, cnt, tiles, tile_end, row_end, N,
                                                         BLOCK_M, BLOCK_N)
        rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        m_ok = rows < row_lim
        bs_ptr = BS + g.to(gl.int64) * sbsg + pid_n * sbsn  # BN = 128: one weight-block scale per K block
        acc = _pipelined(gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma), a_desc, b_desc, a_smem, b_smem, bars, n,
                         row0, b_row, 0, AS + rows * sasm, m_ok, bs_ptr, sask, sbsk, c0,
                         n * (t + nprog < total).to(gl.int32), row0_2, b_row_2, 0, 0, 0, False, False)
        _store(C, acc, row0, pid_n * BLOCK_N, row_lim, N, scm, scn, ROWMAP, MAP_ROWS)
        c0 += n
        row0, row_lim, g, pid_n, b_row = row0_2, row_lim_2, g_2, pid_n_2, b_row_2
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _wgrad_tile(t, total, num_k, num_n, ENDS, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_R: gl.constexpr):
    """Output tile t (K tiles fastest, then N tiles, then groups, as in _wgrad_kernel: programs running
    together read one group's rows, which stay in L2) -> (g, n0, k0, start, end, first, nb): group g owns
    rows [start, end), which lie in the nb row blocks from block `first`; nb = 0 for an empty group and
    for t past the last tile."""
    live = t < total
    g = t // (num_k * num_n)
    n0 = (t // num_k) % num_n * BLOCK_N
    k0 = t % num_k * BLOCK_K
    end = gl.load(ENDS + g, mask=live, other=0).to(gl.int32)
    start = gl.load(ENDS + g - 1, mask=live & (g > 0), other=0).to(gl.int32)
    first = start // BLOCK_R
    nb = ((end + BLOCK_R - 1) // BLOCK_R - first) * (end > start).to(gl.int32)
    return g, n0, k0, start, end, first, nb


@gluon.jit
def _grouped_wgrad_kernel(at_desc, ATS, bt_desc, BTS, C, ENDS, GROUPS, sasn, sasb, sbsk, sbsb, scg, scn, sck,
                          STAGES: gl.constexpr, num_warps: gl.constexpr):
    """`kernels._wgrad_kernel`'s grouped case, tiles and maths: per group g, C[g] [N, K] = the sum over the
    group's rows r of AT[:, r] BT[:, r]^T with 1x128 scales along r.  Persistent: program p computes tiles
    p, p + P, ... (P programs, one per SM), each tile's row blocks pipelined as in _grouped_gemm_kernel and
    its loads running on into the next tile while the tile is promoted and stored.  A block shared with a
    neighbouring group (at most the first and the last of a tile) has the other group's rows zeroed in
    shared memory before its wgmma, as _wgrad_kernel zeroes them after its load."""
    BLOCK_N: gl.constexpr = at_desc.block_type.shape[0]
    BLOCK_R: gl.constexpr = at_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = bt_desc.block_type.shape[0]
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_n = at_desc.shape[0] // BLOCK_N
    num_k = bt_desc.shape[0] // BLOCK_K
    total = GROUPS * num_n * num_k
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_K, 32])
    a_smem = gl.allocate_shared_memory(at_desc.dtype, [STAGES, BLOCK_N, BLOCK_R], at_desc.layout)
    b_smem = gl.allocate_shared_memory(bt_desc.dtype, [STAGES, BLOCK_K, BLOCK_R], bt_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    g, n0, k0, start, end, first, nb = _wgrad_tile(pid, total, num_k, num_n, ENDS, BLOCK_N, BLOCK_K, BLOCK_R)
    c0 = 0
    n_prev = 0
    for t in range(pid, total, nprog):
        g_2, n0_2, k0_2, start_2, end_2, first_2, nb_2 = _wgrad_tile(t + nprog, total, num_k, num_n, ENDS, BLOCK_N,
                                                                     BLOCK_K, BLOCK_R)
        # the previous tile's pipeline loaded this tile's blocks from STAGES - n_prev on; load those before
        top = gl.minimum(nb, gl.maximum(STAGES - n_prev, 0))
        for i in gl.static_range(STAGES):
            _load(at_desc, bt_desc, a_smem, b_smem, bars, c0, i, top, n0, k0, first, 0, n0, k0, 0)
        acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, mma)
        if nb > 0:
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
            offs_k = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, mma))
            acc = _pipelined(acc, at_desc, bt_desc, a_smem, b_smem, bars, nb, n0, k0, first, ATS + offs_n * sasn, None,
                             BTS + offs_k * sbsk, sasb, sbsb, c0, nb_2, n0_2, k0_2, first_2, start, end, True, True)
        _store(C + g.to(gl.int64) * scg, acc, n0, k0, n0 + BLOCK_N, k0 + BLOCK_K, scn, sck, ENDS, False)
        c0 += nb
        n_prev = nb
        g, n0, k0, start, end, first, nb = g_2, n0_2, k0_2, start_2, end_2, first_2, nb_2
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


@functools.cache
def _sms(device) -> int:
    """Streaming multiprocessors: the persistent Fprop's programs."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def operand_layout(rows: int = BN) -> gl.NVMMASharedLayout:
    """The swizzled shared layout of a [rows, 128] e4m3 tile (both operands are K-contiguous)."""
    return gl.NVMMASharedLayout.get_default_for([rows, BK], gl.float8e4nv)


def takes(a: torch.Tensor, b3: torch.Tensor, b_s3: torch.Tensor, counts, row_scales: bool) -> bool:
    """Whether this kernel computes the call: grouped, 128x128 weight scales, Hopper, TMA-able layouts, at
    least STAGES K blocks (a program's loads run at most one tile ahead)."""
    return (counts is not None and not row_scales and a.is_cuda and torch.cuda.get_device_capability(a.device) >= (9, 0)
            and b3.shape[1] % BN == 0 and a.shape[1] % BK == 0 and a.shape[1] // BK >= STAGES
            and a.stride(1) == 1 and b3.stride(2) == 1
            and b3.stride(0) == b3.shape[1] * b3.stride(1))


def grouped_gemm(a, a_s, b3, b_s3, counts, out, out_rows=None):
    """a [M, Kp] e4m3 rows grouped by counts [G] (1x128 scales a_s [M, Kp/128]) x b3 [G, N, Kp] e4m3
    (128x128 scales b_s3 [G, N/128, Kp/128]) -> out [M, N], product row r at out_rows[r] if given; the
    caller checked `takes`."""
    m, k = a.shape
    g, n = b3.shape[0], b3.shape[1]
    layout = operand_layout()
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [BM, BK], operand_layout(BM))
    b_desc = TensorDescriptor(b3, [g * n, k], [b3.stride(1), 1], [BN, BK], layout)
    _grouped_gemm_kernel[(_sms(a.device) * PER_SM, )](
        a_desc, a_s, b_desc, b_s3, out, counts, counts if out_rows is None else out_rows, n, k, a_s.stride(0),
        a_s.stride(1), b_s3.stride(0), b_s3.stride(1), b_s3.stride(2), out.stride(0), out.stride(1), G=g,
        G_P2=triton.next_power_of_2(g), STAGES=STAGES, MAP_ROWS=out_rows is not None, num_warps=WARPS)
    return out


def wgrad_takes(at: torch.Tensor, bt: torch.Tensor, counts) -> bool:
    """Whether the Gluon Wgrad computes the call: grouped, Hopper, N and K multiples of 128, rows contiguous."""
    return (counts is not None and at.is_cuda and torch.cuda.get_device_capability(at.device) >= (9, 0)
            and at.shape[0] % BM == 0 and bt.shape[0] % BN == 0 and at.stride(1) == 1 and bt.stride(1) == 1)


def grouped_wgrad(at, at_s, bt, bt_s, ends, out):
    """at [N, Mp], bt [K, Mp] e4m3 with 1x128 scales along M, groups ending at ends [G] -> out [G, N, K];
    the caller checked `wgrad_takes`."""
    n, mp = at.shape
    k = bt.shape[0]
    layout = operand_layout()
    at_desc = TensorDescriptor(at, [n, mp], [at.stride(0), 1], [BM, BK], operand_layout(BM))
    bt_desc = TensorDescriptor(bt, [k, mp], [bt.stride(0), 1], [BN, BK], layout)
    tiles = ends.numel() * (n // BM) * (k // BN)
    _grouped_wgrad_kernel[(min(tiles, _sms(at.device) * PER_SM), )](
        at_desc, at_s, bt_desc, bt_s, out, ends, ends.numel(), at_s.stride(0), at_s.stride(1), bt_s.stride(0),
        bt_s.stride(1), out.stride(0), out.stride(1), out.stride(2), STAGES=WGRAD_STAGES, num_warps=WARPS)
    return out
