"""The grouped FP8 GEMMs of the routed experts in Gluon (Triton's explicit-layout dialect), Hopper only:
Fprop/Dgrad with the maths and tile schedule of `kernels._gemm_kernel`, and Wgrad with those of
`kernels._wgrad_kernel`, bit-identical to them (GPU tests), warp-specialised and persistent.

Why: in `_gemm_kernel` every 128-deep `tl.dot` is waited on (`wgmma.wait_group 0`) before its fp32
promotion (times the activation and weight scales, added to the accumulator), so the tensor cores idle
during each promotion; Triton 3.6 neither pipelines a dot whose result is consumed in the same iteration
nor warp-specialises this loop on Hopper (bench/results/README.md, FP8 run 15).  A plain Triton FP8
matmul with the same tile and no scales runs the expert shapes at 1,221 / 1,042 TFLOP/s against the
scaled kernel's 703 / 609 (bench/fp8_gemm_ceiling.py, run 16).

How (one program per SM, 12 warps; `gl.warp_specialize`):
  - a producer warp walks the program's tiles (p, p + P, ...) and TMA-loads each 128-deep block of A and
    B into STAGES shared-memory slots, each slot refilled once both consumers have released it (an
    mbarrier counting two arrives), so loads run on from one tile into the next;
  - two consumer warpgroups each own 64 rows of the 128x128 product tile.  Each keeps two wgmma groups
    in flight and promotes block j while block j+1 runs (`_consume`), then issues the next tile's first
    block and stores its rows while that runs (Fprop/Dgrad: 1,014-1,057 / 868-899 TFLOP/s against
    985-1,001 / 794-872 storing first, w13 / w2, one job, run 21).  They meet
    only at the slots' barriers: with one CTA-wide barrier before every load (the previous, single-
    partition kernel: 4 `bar.sync` per block) they ran in lockstep, 894-906 / 808-816 TFLOP/s Fprop
    against 984-1,032 / 855-887 here (w13 / w2, one job, run 19);
  - registers by `setmaxnreg`: consumers 232 (Fprop) or 240 (Wgrad), the producer the rest of
    3 x MAXNREG per thread; no spills (tests/test_sm90_compile.py, which also checks that the promotion's
    FMAs are issued while a wgmma is outstanding and that ptxas keeps the wgmmas asynchronous).

Promotion: Fprop/Dgrad fma(d, a_s * b_s, acc), one FFMA per element (the scales' product is one value per
row); Wgrad (d * a_s) * b_s + acc, its 128 column scales TMA-loaded by the producer with each block's
operands and read by the consumers from shared memory, then fenced against the async proxy, before they
release the slot: 725-737 / 673-723 TFLOP/s (w13 / w2) against 608-622 / 561-580 with the scales loaded
from global memory at each promotion (one job, run 20).  The Wgrad's blocks
shared with a neighbouring group have the other group's rows zeroed in shared memory by each consumer in
its own rows before its wgmma.

Scope: the grouped layouts with 128x128 weight-block scales and 128-multiple N and K (`takes`,
`wgrad_takes`); anything else stays on the Triton kernels (`kernels.GEMM_GLUON`, `WGRAD_GLUON`)."""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Triton 3.9 renamed two Gluon builtins used here; same arguments and meaning (3.6, the H200's, has only the old ones)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

# the product tile (BM rows from A, BN from B) and the block depth; load slots
BM, BN, BK, STAGES = 128, 128, 128, 4
MAXNREG = 168  # x 12 warps x 32 lanes = 64,512 of the SM's 65,536 registers
# setmaxnreg per warpgroup: (consumers, producer), 2 x consumers + producer = 3 x MAXNREG
REGS = {"gemm": (232, 40), "wgrad": (240, 24)}


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _scales_ahead(as_ptrs, a_mask, bs_ptrs, rb, sa, sb, COL_SCALES: gl.constexpr):
    """Block rb's scales that are loaded a block before their promotion: A's, one per row of the product
    tile (masked by a_mask, or None) -> [rows, 1]; and B's 128x128 weight-block scale (Fprop/Dgrad).
    Wgrad's B scales, one per column, are read from shared memory at their promotion instead
    (`_col_scales`: 32 registers a set, carried round the loop they spill) and stand here as 0."""
    a_s = gl.expand_dims(gl.load(as_ptrs + rb * sa, mask=a_mask, other=None if a_mask is None else 0.0), 1)
    if COL_SCALES:
        b_s = 0.0
    else:
        b_s = gl.load(bs_ptrs + rb * sb)
    return a_s, b_s


@gluon.jit
def _promote(acc, d, a_s, b_s):
    """Fprop/Dgrad: acc + a block's raw fp32 product d times its scales, as `_gemm_kernel` rounds it:
    the scales' product first, then one FMA per element, fma(d, a_s * b_s, acc).  Fprop/Dgrad: a_s * b_s is one value
    per row (2 per thread), so the promotion is 64 FFMA per thread and block, where (d * a_s) * b_s took 64
    FMUL more."""
    return acc + d * (a_s * b_s)


@gluon.jit
def _col_scales(b_ahead, s_smem, c, like, COL_SCALES: gl.constexpr):
    """The B scales of load c's promotion.  Wgrad (COL_SCALES): its 128 column scales, [1, cols] in the
    product's layout, read from the shared memory the producer TMA-loaded them into with the operands (so
    they must be read before the slot is released); like: a tensor in the product's layout.  Fprop/Dgrad:
    b_ahead, the weight-block scale."""
    if COL_SCALES:
        b_s = s_smem.index(c % s_smem.shape[0]).load(like.type.layout)  # [1, cols], rows replicated
        # these reads are in the generic proxy and the slot's next TMA write in the async proxy: without
        # this fence before the release, the TMA overwrote scales still being read (2-6 % of back-to-back
        # calls had a wrong tile, none in 3,600 with it; H200, run 20)
        fence_async_shared()
        return b_s
    else:
        return b_ahead


@gluon.jit
def _promote_as(acc, d, a_s, b_s, COL_SCALES: gl.constexpr):
    """Fprop/Dgrad: fma(d, a_s * b_s, acc), one FFMA per element (_promote).  Wgrad: (d * a_s) * b_s + acc,
    the Triton Wgrad's rounding (timed faster than a_s * b_s first, run 19)."""
    if COL_SCALES:
        return acc + d * a_s * b_s
    else:
        return _promote(acc, d, a_s, b_s)


@gluon.jit
def _mask_rows(buf, r0, start, end):
    """Zero the columns of the [BN, BR] tile buf that hold rows r0 + i outside [start, end) (another group's
    tokens, for the Wgrad), through registers; fenced, and every warp past it, before a wgmma reads buf."""
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [gl.num_warps(), 1], [1, 0])
    tile = buf.load(layout)
    r = r0 + gl.arange(0, buf.shape[1], layout=gl.SliceLayout(0, layout))
    buf.store(gl.where(gl.expand_dims((r >= start) & (r < end), 0), tile, gl.zeros_like(tile)))
    fence_async_shared()
    _cta_barrier()


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
def _store_swiglu_backward(C, H, acc, scratch, r0, c0, r_end, n, scr, shr):
    """SwiGLU's backward in the Dgrad's epilogue (FP8RoutedFn): acc holds rows r0.. of da [M, n] (the gradient
    of silu(gate) * up), rounded to BF16 as the unfused path stores it; with gate = H[r, c] and up =
    H[r, n + c] it writes C[r, c] = da * up * sg * (1 + gate * (1 - sg)) and C[r, n + c] = da * gate * sg,
    sg = sigmoid(gate), in fp32 and the order of `reference.swiglu_backward`, so da is never written to
    global memory.  da goes through the warpgroup's shared-memory scratch [rows, cols] and is worked on 16
    rows at a time: with the whole tile's gate, up and sigmoid in registers at once the consumers spilled."""
    CHUNK: gl.constexpr = 16
    VEC: gl.constexpr = 128 // C.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
    COLS: gl.constexpr = acc.shape[1] // VEC
    lanes_c: gl.constexpr = 32 if COLS >= 32 else COLS
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // lanes_c, lanes_c], [gl.num_warps(), 1], [1, 0])
    _cta_barrier()  # every warp has read the previous tile's da
    scratch.store(acc.to(C.dtype.element_ty))
    _cta_barrier()
    c = c0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    for i in gl.static_range(acc.shape[0] // CHUNK):
        da = scratch.slice(i * CHUNK, CHUNK, dim=0).load(layout).to(gl.float32)
        r = r0 + i * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
        mask = gl.expand_dims(r < r_end, 1) & gl.expand_dims(c < n, 0)
        r64 = gl.expand_dims(r.to(gl.int64), 1)
        gate_ptrs = H + r64 * shr + gl.expand_dims(c, 0)
        out_ptrs = C + r64 * scr + gl.expand_dims(c, 0)
        gate = gl.load(gate_ptrs, mask=mask, other=0.0).to(gl.float32)
        up = gl.load(gate_ptrs + n, mask=mask, other=0.0).to(gl.float32)
        sg = 1.0 / (1.0 + gl.exp(-gate))
        gl.store(out_ptrs, (da * up * sg * (1.0 + gate * (1.0 - sg))).to(C.dtype.element_ty), mask=mask)
        gl.store(out_ptrs + n, (da * gate * sg).to(C.dtype.element_ty), mask=mask)


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
def _schedule(COUNTS, N, K, G: gl.constexpr, G_P2: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr):
    """The tile schedule's per-group vectors (group g owns ceil(counts[g] / BM) row tiles), in this partition's warps."""
    vec: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    gi = gl.arange(0, G_P2, layout=vec)
    cnt = gl.load(COUNTS + gi, mask=gi < G, other=0).to(gl.int32)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tile_end = gl.associative_scan(tiles, 0, _add)
    row_end = gl.associative_scan(cnt, 0, _add)
    return gi, cnt, tiles, tile_end, row_end, gl.sum(tiles, axis=0), K // BLOCK_K


@gluon.jit
def _producer(a_desc, b_desc, a_smem, b_smem, full, empty, COUNTS, N, K, G: gl.constexpr, G_P2: gl.constexpr):
    """One warp: load number c goes to slot c % STAGES once both consumers have released that slot's
    previous load (phase parity ((c // STAGES) & 1) ^ 1: a fresh barrier counts as released)."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    gi, cnt, tiles, tile_end, row_end, m_tiles, n = _schedule(COUNTS, N, K, G, G_P2, BLOCK_M, BLOCK_K)
    num_n = N // BLOCK_N
    c = 0
    for t in range(gl.program_id(0), m_tiles * num_n, gl.num_programs(0)):
        row0, row_lim, g, pid_n, b_row = _tile(t, num_n, gi, cnt, tiles, tile_end, row_end, N, BLOCK_M, BLOCK_N)
        for j in range(n):
            s = c % NUM_STAGES
            mbarrier.wait(empty.index(s), phase=((c // NUM_STAGES) & 1) ^ 1)
            mbarrier.expect(full.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            _tma_load(a_desc, [row0, j * BLOCK_K], full.index(s), a_smem.index(s))
            _tma_load(b_desc, [b_row, j * BLOCK_K], full.index(s), b_smem.index(s))
            c += 1


@gluon.jit
def _issue(a_smem, b_smem, full, c, regs, blk, start, end, WG: gl.constexpr, EDGES: gl.constexpr):
    """This warpgroup's wgmma of load c: its rows of A's slot x B's slot^T, async, once the load landed.
    EDGES (Wgrad): the load is row block blk, and where it holds rows outside [start, end), this
    warpgroup zeroes them in its own rows of A first (the other warpgroup never reads those)."""
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    HALF: gl.constexpr = a_smem.shape[1] // 2
    s = c % NUM_STAGES
    mbarrier.wait(full.index(s), phase=(c // NUM_STAGES) & 1)
    a = a_smem.index(s).slice(WG * HALF, HALF)
    if EDGES:
        r0 = blk * a_smem.shape[2]
        if (r0 < start) | (r0 + a_smem.shape[2] > end):
            _mask_rows(a, r0, start, end)
    return warpgroup_mma(a, b_smem.index(s).permute((1, 0)), regs, use_acc=False, is_async=True)


@gluon.jit
def _release(empty, c, NUM_STAGES: gl.constexpr):
    mbarrier.arrive(empty.index(c % NUM_STAGES), count=1)


@gluon.jit
def _consume(acc, xa, a_smem, b_smem, s_smem, full, empty, n, base, as_ptrs, a_mask, bs_ptrs, sa, sb, c0, start, end,
             WG: gl.constexpr, COL_SCALES: gl.constexpr, EDGES: gl.constexpr):
    """One consumer warpgroup's share of a tile: acc + its rows of the n >= 1 blocks base .. base+n-1 (this
    program's loads c0 ..), whose first block's wgmma the caller issued (xa: `_issue` of load c0 into a
    zero tile), with two wgmma groups in flight: block j+1's wgmma is issued before block j
    is waited on (`wait_group 1`), block j is promoted while j+1 runs, and its slot released.

    Two register tiles take turns (xa, xb).  A wgmma in flight crosses the loop's back-edge (xa), and its
    registers must not be copied there: a copy of an in-flight accumulator makes ptxas serialise every
    wgmma (C7514).  So each tile goes round a chain of tied operands only: wait -> promotion reads it ->
    a `wait_group 1` that takes the tile and the new acc (it stalls on nothing, the other group may stay
    outstanding; it pins the promotion before the tile is reused, which LLVM would otherwise sink below
    the next issue and copy the tile for) -> the next wgmma issued into it."""
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    pa, pb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base, sa, sb, COL_SCALES)
    xb = gl.zeros_like(acc)
    for j in range(1, n - 1, 2):
        xb = _issue(a_smem, b_smem, full, c0 + j, xb, base + j, start, end, WG, EDGES)
        ca, cb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + j, sa, sb, COL_SCALES)
        xa, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))  # block j-1 done
        bs = _col_scales(pb, s_smem, c0 + j - 1, acc, COL_SCALES)
        _release(empty, c0 + j - 1, NUM_STAGES)
        acc = _promote_as(acc, xa, pa, bs, COL_SCALES)
        xa, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))  # pin
        xa = _issue(a_smem, b_smem, full, c0 + j + 1, xa, base + j + 1, start, end, WG, EDGES)
        pa, pb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + j + 1, sa, sb, COL_SCALES)
        xb, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xb, acc))  # block j done
        bs = _col_scales(cb, s_smem, c0 + j, acc, COL_SCALES)
        _release(empty, c0 + j, NUM_STAGES)
        acc = _promote_as(acc, xb, ca, bs, COL_SCALES)
        xb, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xb, acc))  # pin
    if n % 2 == 0:
        last = _issue(a_smem, b_smem, full, c0 + n - 1, xb, base + n - 1, start, end, WG, EDGES)
        ca, cb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + n - 1, sa, sb, COL_SCALES)
        d, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))
        bs = _col_scales(pb, s_smem, c0 + n - 2, acc, COL_SCALES)
        _release(empty, c0 + n - 2, NUM_STAGES)
        acc = _promote_as(acc, d, pa, bs, COL_SCALES)
        d, acc = warpgroup_mma_wait(num_outstanding=0, deps=(last, acc))
        bs = _col_scales(cb, s_smem, c0 + n - 1, acc, COL_SCALES)
        _release(empty, c0 + n - 1, NUM_STAGES)
        acc = _promote_as(acc, d, ca, bs, COL_SCALES)
    else:
        d, acc = warpgroup_mma_wait(num_outstanding=0, deps=(xa, acc))
        bs = _col_scales(pb, s_smem, c0 + n - 1, acc, COL_SCALES)
        _release(empty, c0 + n - 1, NUM_STAGES)
        acc = _promote_as(acc, d, pa, bs, COL_SCALES)
    return acc


@gluon.jit
def _consume_tile(xa, t, c0, a_smem, b_smem, full, empty, AS, BS, gi, cnt, tiles, tile_end, row_end, N, n, sasm, sask,
                  sbsg, sbsn, sbsk, BLOCK_N: gl.constexpr, WG: gl.constexpr):
    """This warpgroup's rows of product tile t, whose first block (load c0) xa was issued for ->
    (acc [BM/2, BN] in the wgmma layout, its first row, the tile's row limit, its first column)."""
    BLOCK_M: gl.constexpr = a_smem.shape[1]
    HALF: gl.constexpr = BLOCK_M // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, BLOCK_N, 32])
    row0, row_lim, g, pid_n, b_row = _tile(t, N // BLOCK_N, gi, cnt, tiles, tile_end, row_end, N, BLOCK_M, BLOCK_N)
    rows = row0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
    bs_ptr = BS + g.to(gl.int64) * sbsg + pid_n * sbsn
    acc = _consume(gl.zeros([HALF, BLOCK_N], gl.float32, mma), xa, a_smem, b_smem, None, full, empty, n, 0,
                   AS + rows * sasm, rows < row_lim, bs_ptr, sask, sbsk, c0, 0, 0, WG, False, False)
    return acc, row0 + WG * HALF, row_lim, pid_n * BLOCK_N


@gluon.jit
def _epilogue(C, H, acc, scratch, r0, c0, r_end, N, scm, scn, shm, ROWMAP, MAP_ROWS: gl.constexpr,
              SWIGLU_BWD: gl.constexpr):
    """A consumer's rows of a product tile out: `_store_swiglu_backward` (SWIGLU_BWD) or `_store`."""
    if SWIGLU_BWD:
        _store_swiglu_backward(C, H, acc, scratch, r0, c0, r_end, N, scm, shm)
    else:
        _store(C, acc, r0, c0, r_end, N, scm, scn, ROWMAP, MAP_ROWS)


@gluon.jit
def _consumer(a_smem, b_smem, full, empty, scratch, AS, BS, C, COUNTS, ROWMAP, H, N, K, sasm, sask, sbsg, sbsn, sbsk,
              scm, scn, shm, BLOCK_N: gl.constexpr, G: gl.constexpr, G_P2: gl.constexpr, MAP_ROWS: gl.constexpr,
              SWIGLU_BWD: gl.constexpr, WG: gl.constexpr):
    """Warpgroup WG: rows WG * 64 .. of every product tile of this program (every tile is n blocks deep, so
    tile i's loads start at i * n).  The next tile's first wgmma is issued before a tile is stored, so the
    tensor cores work through the store (which cost 13-35 % of the time, run 20; 3-5 % faster, run 21).  The
    last tile is peeled off the loop: issuing under a condition would merge an in-flight accumulator with
    another value, a copy that makes ptxas serialise the wgmmas (C7514)."""
    BLOCK_M: gl.constexpr = a_smem.shape[1]
    BLOCK_K: gl.constexpr = a_smem.shape[2]
    HALF: gl.constexpr = BLOCK_M // 2
    gi, cnt, tiles, tile_end, row_end, m_tiles, n = _schedule(COUNTS, N, K, G, G_P2, BLOCK_M, BLOCK_K)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, BLOCK_N, 32])
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    mine = (m_tiles * (N // BLOCK_N) - pid + programs - 1) // programs  # this program's tiles
    if mine > 0:
        xa = _issue(a_smem, b_smem, full, 0, gl.zeros([HALF, BLOCK_N], gl.float32, mma), 0, 0, 0, WG, False)
        for i in range(mine - 1):
            acc, r0, row_lim, c_0 = _consume_tile(xa, pid + i * programs, i * n, a_smem, b_smem, full, empty, AS, BS, gi,
                                                  cnt, tiles, tile_end, row_end, N, n, sasm, sask, sbsg, sbsn, sbsk,
                                                  BLOCK_N, WG)
            xa = _issue(a_smem, b_smem, full, (i + 1) * n, gl.zeros_like(acc), 0, 0, 0, WG, False)
            _epilogue(C, H, acc, scratch.index(WG), r0, c_0, row_lim, N, scm, scn, shm, ROWMAP, MAP_ROWS, SWIGLU_BWD)
        acc, r0, row_lim, c_0 = _consume_tile(xa, pid + (mine - 1) * programs, (mine - 1) * n, a_smem, b_smem, full,
                                              empty, AS, BS, gi, cnt, tiles, tile_end, row_end, N, n, sasm, sask, sbsg,
                                              sbsn, sbsk, BLOCK_N, WG)
        _epilogue(C, H, acc, scratch.index(WG), r0, c_0, row_lim, N, scm, scn, shm, ROWMAP, MAP_ROWS, SWIGLU_BWD)


@gluon.jit
def _grouped_gemm_kernel(a_desc, AS, b_desc, BS, C, COUNTS, ROWMAP, H, N, K, sasm, sask, sbsg, sbsn, sbsk, scm, scn,
                            shm, G: gl.constexpr, G_P2: gl.constexpr, STAGES: gl.constexpr, MAP_ROWS: gl.constexpr,
                            SWIGLU_BWD: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                            num_warps: gl.constexpr):
    """Persistent: program p computes tiles p, p + P, ... (N tiles fastest); the default partition
    (num_warps = 4) is consumer 0, the workers consumer 1 and the producer.  MAP_ROWS: row r of the
    product is stored as row ROWMAP[r] of C.  SWIGLU_BWD: the product is da and C [M, 2N] receives SwiGLU's
    backward at H [M, 2N] (row stride shm) instead (`_store_swiglu_backward`)."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
    if SWIGLU_BWD:  # each consumer's da tile, [BM / 2, BN] BF16
        scratch = gl.allocate_shared_memory(C.dtype.element_ty, [2, BLOCK_M // 2, BLOCK_N],
                                            gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, BLOCK_N], C.dtype.element_ty))
    else:
        scratch = empty  # unused
    gl.warp_specialize([
        (_consumer, (a_smem, b_smem, full, empty, scratch, AS, BS, C, COUNTS, ROWMAP, H, N, K, sasm, sask, sbsg, sbsn,
                     sbsk, scm, scn, shm, BLOCK_N, G, G_P2, MAP_ROWS, SWIGLU_BWD, 0)),
        (_consumer, (a_smem, b_smem, full, empty, scratch, AS, BS, C, COUNTS, ROWMAP, H, N, K, sasm, sask, sbsg, sbsn,
                     sbsk, scm, scn, shm, BLOCK_N, G, G_P2, MAP_ROWS, SWIGLU_BWD, 1)),
        (_producer, (a_desc, b_desc, a_smem, b_smem, full, empty, COUNTS, N, K, G, G_P2)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


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
def _wgrad_producer(at_desc, bt_desc, bts_desc, a_smem, b_smem, s_smem, full, empty, ENDS, GROUPS):
    """One warp: the row blocks of this program's Wgrad tiles, in order (load counter as _producer), each
    with its 128 column scales (bts_desc: BT's scales as [Mp/128, K])."""
    BLOCK_N: gl.constexpr = at_desc.block_type.shape[0]
    BLOCK_R: gl.constexpr = at_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = bt_desc.block_type.shape[0]
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    num_n = at_desc.shape[0] // BLOCK_N
    num_k = bt_desc.shape[0] // BLOCK_K
    total = GROUPS * num_n * num_k
    c = 0
    for t in range(gl.program_id(0), total, gl.num_programs(0)):
        g, n0, k0, start, end, first, nb = _wgrad_tile(t, total, num_k, num_n, ENDS, BLOCK_N, BLOCK_K, BLOCK_R)
        for j in range(nb):
            s = c % NUM_STAGES
            mbarrier.wait(empty.index(s), phase=((c // NUM_STAGES) & 1) ^ 1)
            mbarrier.expect(full.index(s), at_desc.block_type.nbytes + bt_desc.block_type.nbytes
                            + bts_desc.block_type.nbytes)
            _tma_load(at_desc, [n0, (first + j) * BLOCK_R], full.index(s), a_smem.index(s))
            _tma_load(bt_desc, [k0, (first + j) * BLOCK_R], full.index(s), b_smem.index(s))
            _tma_load(bts_desc, [first + j, k0], full.index(s), s_smem.index(s))
            c += 1


@gluon.jit
def _wgrad_consumer(a_smem, b_smem, s_smem, full, empty, ATS, C, ENDS, GROUPS, NUM_N, NUM_K, sasn, sasb, scg, scn, sck,
                    WG: gl.constexpr):
    """Warpgroup WG: rows WG * 64 .. of every Wgrad tile of this program; an empty group's tiles store zeros."""
    BLOCK_N: gl.constexpr = a_smem.shape[1]
    BLOCK_R: gl.constexpr = a_smem.shape[2]
    BLOCK_K: gl.constexpr = b_smem.shape[1]
    HALF: gl.constexpr = BLOCK_N // 2
    total = GROUPS * NUM_N * NUM_K
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, BLOCK_K, 32])
    c0 = 0
    for t in range(gl.program_id(0), total, gl.num_programs(0)):
        g, n0, k0, start, end, first, nb = _wgrad_tile(t, total, NUM_K, NUM_N, ENDS, BLOCK_N, BLOCK_K, BLOCK_R)
        offs_n = n0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
        acc = gl.zeros([HALF, BLOCK_K], gl.float32, mma)
        if nb > 0:
            xa = _issue(a_smem, b_smem, full, c0, gl.zeros_like(acc), first, start, end, WG, True)
            acc = _consume(acc, xa, a_smem, b_smem, s_smem, full, empty, nb, first, ATS + offs_n * sasn, None, None, sasb,
                           0, c0, start, end, WG, True, True)
        _store(C + g.to(gl.int64) * scg, acc, n0 + WG * HALF, k0, n0 + BLOCK_N, k0 + BLOCK_K, scn, sck, ENDS, False)
        c0 += nb


@gluon.jit
def _grouped_wgrad_kernel(at_desc, ATS, bt_desc, bts_desc, C, ENDS, GROUPS, sasn, sasb, scg, scn, sck,
                             STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                             num_warps: gl.constexpr):
    """`kernels._wgrad_kernel`'s grouped case, tiles and maths: per group g, C[g] [N, K] = the sum over the
    group's rows r of AT[:, r] BT[:, r]^T with 1x128 scales along r; persistent and warp-specialised as
    _grouped_gemm_kernel."""
    BLOCK_N: gl.constexpr = at_desc.block_type.shape[0]
    BLOCK_R: gl.constexpr = at_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = bt_desc.block_type.shape[0]
    a_smem = gl.allocate_shared_memory(at_desc.dtype, [STAGES, BLOCK_N, BLOCK_R], at_desc.layout)
    b_smem = gl.allocate_shared_memory(bt_desc.dtype, [STAGES, BLOCK_K, BLOCK_R], bt_desc.layout)
    s_smem = gl.allocate_shared_memory(bts_desc.dtype, [STAGES, 1, BLOCK_K], bts_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    num_n = at_desc.shape[0] // BLOCK_N
    num_k = bt_desc.shape[0] // BLOCK_K
    gl.warp_specialize([
        (_wgrad_consumer, (a_smem, b_smem, s_smem, full, empty, ATS, C, ENDS, GROUPS, num_n, num_k, sasn, sasb, scg, scn,
                           sck, 0)),
        (_wgrad_consumer, (a_smem, b_smem, s_smem, full, empty, ATS, C, ENDS, GROUPS, num_n, num_k, sasn, sasb, scg, scn,
                           sck, 1)),
        (_wgrad_producer, (at_desc, bt_desc, bts_desc, a_smem, b_smem, s_smem, full, empty, ENDS, GROUPS)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@functools.cache
def _sms(device) -> int:
    """Streaming multiprocessors: the persistent kernels' programs."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache  # built once: ~5 us of host time per call otherwise (two per GEMM launch)
def operand_layout(rows: int = BN) -> gl.NVMMASharedLayout:
    """The swizzled shared layout of a [rows, 128] e4m3 tile (both operands are K-contiguous)."""
    return gl.NVMMASharedLayout.get_default_for([rows, BK], gl.float8e4nv)


@functools.cache
def _scale_row_layout() -> gl.NVMMASharedLayout:
    """The shared layout of the Wgrad's [1, 128] fp32 rows of column scales."""
    return gl.NVMMASharedLayout.get_default_for([1, BN], gl.float32)


def takes(a: torch.Tensor, b3: torch.Tensor, b_s3: torch.Tensor, row_scales: bool) -> bool:
    """Whether this kernel computes the call (grouped, or dense as one group): 128x128 weight scales, Hopper,
    TMA-able layouts, at least STAGES K blocks (a program's loads run at most one tile ahead)."""
    return (not row_scales and a.is_cuda and torch.cuda.get_device_capability(a.device) >= (9, 0)
            and b3.shape[1] % BN == 0 and a.shape[1] % BK == 0 and a.shape[1] // BK >= STAGES
            and a.stride(1) == 1 and b3.stride(2) == 1
            and b3.stride(0) == b3.shape[1] * b3.stride(1))


def grouped_gemm(a, a_s, b3, b_s3, counts, out, out_rows=None, swiglu_h=None):
    """a [M, Kp] e4m3 rows grouped by counts [G] (1x128 scales a_s [M, Kp/128]) x b3 [G, N, Kp] e4m3
    (128x128 scales b_s3 [G, N/128, Kp/128]) -> out [M, N], product row r at out_rows[r] if given; the
    caller checked `takes`.  With swiglu_h [M, 2N] (SwiGLU's input h; no out_rows) the product is da and out
    [M, 2N] receives SwiGLU's backward, dh (`_store_swiglu_backward`)."""
    m, k = a.shape
    g, n = b3.shape[0], b3.shape[1]
    if swiglu_h is not None:
        assert out_rows is None and swiglu_h.shape == out.shape == (m, 2 * n) and swiglu_h.stride(1) == out.stride(1) == 1
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [BM, BK], operand_layout(BM))
    b_desc = TensorDescriptor(b3, [g * n, k], [b3.stride(1), 1], [BN, BK], operand_layout(BN))
    h = out if swiglu_h is None else swiglu_h
    _grouped_gemm_kernel[(_sms(a.device), )](
        a_desc, a_s, b_desc, b_s3, out, counts, counts if out_rows is None else out_rows, h, n, k, a_s.stride(0),
        a_s.stride(1), b_s3.stride(0), b_s3.stride(1), b_s3.stride(2), out.stride(0), out.stride(1), h.stride(0),
        G=g, G_P2=triton.next_power_of_2(g), STAGES=STAGES, MAP_ROWS=out_rows is not None,
        SWIGLU_BWD=swiglu_h is not None, CONSUMER_REGS=REGS["gemm"][0], PRODUCER_REGS=REGS["gemm"][1], num_warps=4,
        maxnreg=MAXNREG)
    return out


def wgrad_takes(at: torch.Tensor, bt: torch.Tensor, bt_s: torch.Tensor, counts) -> bool:
    """Whether the Gluon Wgrad computes the call: grouped, Hopper, N and K multiples of 128, rows contiguous,
    BT's scales [K, Mp/128] stored as [Mp/128, K] (TMA-loaded by rows of that)."""
    return (counts is not None and at.is_cuda and torch.cuda.get_device_capability(at.device) >= (9, 0)
            and at.shape[0] % BM == 0 and bt.shape[0] % BN == 0 and at.stride(1) == 1 and bt.stride(1) == 1
            and bt_s.stride(0) == 1)


def grouped_wgrad(at, at_s, bt, bt_s, ends, out):
    """at [N, Mp], bt [K, Mp] e4m3 with 1x128 scales along M, groups ending at ends [G] -> out [G, N, K];
    the caller checked `wgrad_takes`."""
    n, mp = at.shape
    k = bt.shape[0]
    at_desc = TensorDescriptor(at, [n, mp], [at.stride(0), 1], [BM, BK], operand_layout(BM))
    bt_desc = TensorDescriptor(bt, [k, mp], [bt.stride(0), 1], [BN, BK], operand_layout(BN))
    bts_desc = TensorDescriptor(bt_s, [bt_s.shape[1], k], [bt_s.stride(1), 1], [1, BN], _scale_row_layout())
    tiles = ends.numel() * (n // BM) * (k // BN)
    _grouped_wgrad_kernel[(min(tiles, _sms(at.device)), )](
        at_desc, at_s, bt_desc, bts_desc, out, ends, ends.numel(), at_s.stride(0), at_s.stride(1), out.stride(0),
        out.stride(1), out.stride(2), STAGES=STAGES, CONSUMER_REGS=REGS["wgrad"][0], PRODUCER_REGS=REGS["wgrad"][1],
        num_warps=4, maxnreg=MAXNREG)
    return out
