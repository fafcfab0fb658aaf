"""EXPERIMENT: the grouped FP8 Fprop/Dgrad of gluon_gemm.py, warp-specialised.

One producer warp issues every TMA load; two consumer warpgroups each own 64 rows of the 128x128 product
tile, run the same two-groups-in-flight promotion loop as `gluon_gemm._pipelined`, and hand a slot back by
an mbarrier arrive once their wgmma reading it has completed (the slot's `empty` barrier counts both).
In gluon_gemm.py one thread issues the loads after a CTA-wide barrier, so the two warpgroups run in
lockstep (4 `bar.sync` per block in the compiled loop); here they synchronise only through the
barriers of the slots they share.  Same tiles, same maths, same rounding: bit-identical to
`kernels._gemm_kernel`."""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import gluon_gemm
from .gluon_gemm import BK, BM, BN, _add, _mask_rows, _promote, _scales_ahead, _store, _tile, _wgrad_tile, operand_layout

STAGES, MAXNREG = 4, 168  # 168 x 12 warps x 32 lanes: the register file, 65,536 less 1,024
# setmaxnreg per warpgroup (Fprop, Wgrad): consumers, producer; 2 x consumers + producer = 3 x MAXNREG
REGS = {"gemm": (232, 40), "wgrad": (240, 24)}


@gluon.jit
def _schedule(COUNTS, N, K, G: gl.constexpr, G_P2: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr):
    """The tile schedule's per-group vectors (as _grouped_gemm_kernel), in this partition's warps."""
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
            tma.async_copy_global_to_shared(a_desc, [row0, j * BLOCK_K], full.index(s), a_smem.index(s))
            tma.async_copy_global_to_shared(b_desc, [b_row, j * BLOCK_K], full.index(s), b_smem.index(s))
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
def _promote_as(acc, d, a_s, b_ahead, bs_ptrs, rb, sb, COL_SCALES: gl.constexpr):
    """Fprop/Dgrad: fma(d, a_s * b_s, acc), one FFMA per element (gluon_gemm._promote).  Wgrad: its 128
    column scales loaded here, and (d * a_s) * b_s + acc, the Triton Wgrad's rounding: in this order the
    FMUL d * a_s does not wait for the loads (timed faster than a_s * b_s first, run 19)."""
    if COL_SCALES:
        return acc + d * a_s * gl.expand_dims(gl.load(bs_ptrs + rb * sb), 0)
    else:
        return _promote(acc, d, a_s, b_ahead)


@gluon.jit
def _consume(acc, a_smem, b_smem, full, empty, n, base, as_ptrs, a_mask, bs_ptrs, sa, sb, c0, start, end,
             WG: gl.constexpr, COL_SCALES: gl.constexpr, EDGES: gl.constexpr):
    """gluon_gemm._pipelined for one warpgroup, the loads replaced by releases: acc + the tile's n >= 1
    blocks base .., two wgmma groups in flight, block j promoted while j+1 runs (see _pipelined for the
    tied operands that keep ptxas from serialising the wgmmas)."""
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    pa, pb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base, sa, sb, COL_SCALES)
    xb = gl.zeros_like(acc)
    xa = _issue(a_smem, b_smem, full, c0, gl.zeros_like(acc), base, start, end, WG, EDGES)
    for j in range(1, n - 1, 2):
        xb = _issue(a_smem, b_smem, full, c0 + j, xb, base + j, start, end, WG, EDGES)
        ca, cb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + j, sa, sb, COL_SCALES)
        xa, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))  # block j-1 done
        _release(empty, c0 + j - 1, NUM_STAGES)
        acc = _promote_as(acc, xa, pa, pb, bs_ptrs, base + j - 1, sb, COL_SCALES)
        xa, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))  # pin
        xa = _issue(a_smem, b_smem, full, c0 + j + 1, xa, base + j + 1, start, end, WG, EDGES)
        pa, pb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + j + 1, sa, sb, COL_SCALES)
        xb, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xb, acc))  # block j done
        _release(empty, c0 + j, NUM_STAGES)
        acc = _promote_as(acc, xb, ca, cb, bs_ptrs, base + j, sb, COL_SCALES)
        xb, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xb, acc))  # pin
    if n % 2 == 0:
        last = _issue(a_smem, b_smem, full, c0 + n - 1, xb, base + n - 1, start, end, WG, EDGES)
        ca, cb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, base + n - 1, sa, sb, COL_SCALES)
        d, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))
        _release(empty, c0 + n - 2, NUM_STAGES)
        acc = _promote_as(acc, d, pa, pb, bs_ptrs, base + n - 2, sb, COL_SCALES)
        d, acc = warpgroup_mma_wait(num_outstanding=0, deps=(last, acc))
        _release(empty, c0 + n - 1, NUM_STAGES)
        acc = _promote_as(acc, d, ca, cb, bs_ptrs, base + n - 1, sb, COL_SCALES)
    else:
        d, acc = warpgroup_mma_wait(num_outstanding=0, deps=(xa, acc))
        _release(empty, c0 + n - 1, NUM_STAGES)
        acc = _promote_as(acc, d, pa, pb, bs_ptrs, base + n - 1, sb, COL_SCALES)
    return acc


@gluon.jit
def _consumer(a_smem, b_smem, full, empty, AS, BS, C, COUNTS, ROWMAP, N, K, sasm, sask, sbsg, sbsn, sbsk, scm, scn,
              BLOCK_N: gl.constexpr, G: gl.constexpr, G_P2: gl.constexpr, MAP_ROWS: gl.constexpr, WG: gl.constexpr):
    """Warpgroup WG: rows WG * 64 .. of every product tile of this program."""
    BLOCK_M: gl.constexpr = a_smem.shape[1]
    BLOCK_K: gl.constexpr = a_smem.shape[2]
    HALF: gl.constexpr = BLOCK_M // 2
    gi, cnt, tiles, tile_end, row_end, m_tiles, n = _schedule(COUNTS, N, K, G, G_P2, BLOCK_M, BLOCK_K)
    num_n = N // BLOCK_N
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, BLOCK_N, 32])
    c0 = 0
    for t in range(gl.program_id(0), m_tiles * num_n, gl.num_programs(0)):
        row0, row_lim, g, pid_n, b_row = _tile(t, num_n, gi, cnt, tiles, tile_end, row_end, N, BLOCK_M, BLOCK_N)
        rows = row0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
        m_ok = rows < row_lim
        bs_ptr = BS + g.to(gl.int64) * sbsg + pid_n * sbsn
        acc = _consume(gl.zeros([HALF, BLOCK_N], gl.float32, mma), a_smem, b_smem, full, empty, n, 0, AS + rows * sasm,
                       m_ok, bs_ptr, sask, sbsk, c0, 0, 0, WG, False, False)
        _store(C, acc, row0 + WG * HALF, pid_n * BLOCK_N, row_lim, N, scm, scn, ROWMAP, MAP_ROWS)
        c0 += n


@gluon.jit
def _grouped_gemm_ws_kernel(a_desc, AS, b_desc, BS, C, COUNTS, ROWMAP, N, K, sasm, sask, sbsg, sbsn, sbsk, scm, scn,
                            G: gl.constexpr, G_P2: gl.constexpr, STAGES: gl.constexpr, MAP_ROWS: gl.constexpr,
                            CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Persistent, as _grouped_gemm_kernel: program p computes tiles p, p + P, ...; the default partition
    (num_warps = 4) is consumer 0, the workers consumer 1 and the producer."""
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
    gl.warp_specialize([
        (_consumer, (a_smem, b_smem, full, empty, AS, BS, C, COUNTS, ROWMAP, N, K, sasm, sask, sbsg, sbsn, sbsk, scm, scn,
                     BLOCK_N, G, G_P2, MAP_ROWS, 0)),
        (_consumer, (a_smem, b_smem, full, empty, AS, BS, C, COUNTS, ROWMAP, N, K, sasm, sask, sbsg, sbsn, sbsk, scm, scn,
                     BLOCK_N, G, G_P2, MAP_ROWS, 1)),
        (_producer, (a_desc, b_desc, a_smem, b_smem, full, empty, COUNTS, N, K, G, G_P2)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def grouped_gemm(a, a_s, b3, b_s3, counts, out, out_rows=None):
    """gluon_gemm.grouped_gemm through the warp-specialised kernel (the caller checked gluon_gemm.takes,
    with BM = 128)."""
    m, k = a.shape
    g, n = b3.shape[0], b3.shape[1]
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [BM, BK], operand_layout(BM))
    b_desc = TensorDescriptor(b3, [g * n, k], [b3.stride(1), 1], [BN, BK], operand_layout(BN))
    _grouped_gemm_ws_kernel[(gluon_gemm._sms(a.device), )](
        a_desc, a_s, b_desc, b_s3, out, counts, counts if out_rows is None else out_rows, n, k, a_s.stride(0),
        a_s.stride(1), b_s3.stride(0), b_s3.stride(1), b_s3.stride(2), out.stride(0), out.stride(1), G=g,
        G_P2=triton.next_power_of_2(g), STAGES=STAGES, MAP_ROWS=out_rows is not None, CONSUMER_REGS=REGS["gemm"][0],
        PRODUCER_REGS=REGS["gemm"][1], num_warps=4, maxnreg=MAXNREG)
    return out


@gluon.jit
def _wgrad_producer(at_desc, bt_desc, a_smem, b_smem, full, empty, ENDS, GROUPS):
    """One warp: the row blocks of this program's Wgrad tiles, in order (load counter as _producer)."""
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
            mbarrier.expect(full.index(s), at_desc.block_type.nbytes + bt_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(at_desc, [n0, (first + j) * BLOCK_R], full.index(s), a_smem.index(s))
            tma.async_copy_global_to_shared(bt_desc, [k0, (first + j) * BLOCK_R], full.index(s), b_smem.index(s))
            c += 1


@gluon.jit
def _wgrad_consumer(a_smem, b_smem, full, empty, ATS, BTS, C, ENDS, GROUPS, NUM_N, NUM_K, sasn, sasb, sbsk, sbsb, scg,
                    scn, sck, WG: gl.constexpr):
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
        offs_k = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, mma))
        acc = gl.zeros([HALF, BLOCK_K], gl.float32, mma)
        if nb > 0:
            acc = _consume(acc, a_smem, b_smem, full, empty, nb, first, ATS + offs_n * sasn, None, BTS + offs_k * sbsk,
                           sasb, sbsb, c0, start, end, WG, True, True)
        _store(C + g.to(gl.int64) * scg, acc, n0 + WG * HALF, k0, n0 + BLOCK_N, k0 + BLOCK_K, scn, sck, ENDS, False)
        c0 += nb


@gluon.jit
def _grouped_wgrad_ws_kernel(at_desc, ATS, bt_desc, BTS, C, ENDS, GROUPS, sasn, sasb, sbsk, sbsb, scg, scn, sck,
                             STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                             num_warps: gl.constexpr):
    """gluon_gemm._grouped_wgrad_kernel's tiles and maths, warp-specialised as _grouped_gemm_ws_kernel."""
    BLOCK_N: gl.constexpr = at_desc.block_type.shape[0]
    BLOCK_R: gl.constexpr = at_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = bt_desc.block_type.shape[0]
    a_smem = gl.allocate_shared_memory(at_desc.dtype, [STAGES, BLOCK_N, BLOCK_R], at_desc.layout)
    b_smem = gl.allocate_shared_memory(bt_desc.dtype, [STAGES, BLOCK_K, BLOCK_R], bt_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    num_n = at_desc.shape[0] // BLOCK_N
    num_k = bt_desc.shape[0] // BLOCK_K
    gl.warp_specialize([
        (_wgrad_consumer, (a_smem, b_smem, full, empty, ATS, BTS, C, ENDS, GROUPS, num_n, num_k, sasn, sasb, sbsk, sbsb,
                           scg, scn, sck, 0)),
        (_wgrad_consumer, (a_smem, b_smem, full, empty, ATS, BTS, C, ENDS, GROUPS, num_n, num_k, sasn, sasb, sbsk, sbsb,
                           scg, scn, sck, 1)),
        (_wgrad_producer, (at_desc, bt_desc, a_smem, b_smem, full, empty, ENDS, GROUPS)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def grouped_wgrad(at, at_s, bt, bt_s, ends, out):
    """gluon_gemm.grouped_wgrad through the warp-specialised kernel (the caller checked gluon_gemm.wgrad_takes)."""
    n, mp = at.shape
    k = bt.shape[0]
    at_desc = TensorDescriptor(at, [n, mp], [at.stride(0), 1], [BM, BK], operand_layout(BM))
    bt_desc = TensorDescriptor(bt, [k, mp], [bt.stride(0), 1], [BN, BK], operand_layout(BN))
    tiles = ends.numel() * (n // BM) * (k // BN)
    _grouped_wgrad_ws_kernel[(min(tiles, gluon_gemm._sms(at.device)), )](
        at_desc, at_s, bt_desc, bt_s, out, ends, ends.numel(), at_s.stride(0), at_s.stride(1), bt_s.stride(0),
        bt_s.stride(1), out.stride(0), out.stride(1), out.stride(2), STAGES=STAGES, CONSUMER_REGS=REGS["wgrad"][0],
        PRODUCER_REGS=REGS["wgrad"][1], num_warps=4, maxnreg=MAXNREG)
    return out
