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

from .gluon_gemm import BK, BM, BN, _add, _promote, _scales_ahead, _sms, _store, _tile, operand_layout

STAGES, CONSUMER_REGS, PRODUCER_REGS, MAXNREG = 4, 232, 40, 168


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
def _issue(a_smem, b_smem, full, c, regs, WG: gl.constexpr):
    """This warpgroup's wgmma of load c: its 64 rows of A's slot x B's slot^T, async, once the load landed."""
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    HALF: gl.constexpr = a_smem.shape[1] // 2
    s = c % NUM_STAGES
    mbarrier.wait(full.index(s), phase=(c // NUM_STAGES) & 1)
    return warpgroup_mma(a_smem.index(s).slice(WG * HALF, HALF), b_smem.index(s).permute((1, 0)), regs, use_acc=False,
                         is_async=True)


@gluon.jit
def _release(empty, c, NUM_STAGES: gl.constexpr):
    mbarrier.arrive(empty.index(c % NUM_STAGES), count=1)


@gluon.jit
def _consume(acc, a_smem, b_smem, full, empty, n, as_ptrs, a_mask, bs_ptrs, sa, sb, c0, WG: gl.constexpr):
    """gluon_gemm._pipelined for one warpgroup, the loads replaced by releases: acc + the tile's n >= 1
    blocks, two wgmma groups in flight, block j promoted while j+1 runs (see _pipelined for the tied
    operands that keep ptxas from serialising the wgmmas)."""
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    pa, pb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, 0, sa, sb, False)
    xb = gl.zeros_like(acc)
    xa = _issue(a_smem, b_smem, full, c0, gl.zeros_like(acc), WG)
    for j in range(1, n - 1, 2):
        xb = _issue(a_smem, b_smem, full, c0 + j, xb, WG)
        ca, cb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, j, sa, sb, False)
        xa, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))  # block j-1 done
        _release(empty, c0 + j - 1, NUM_STAGES)
        acc = _promote(acc, xa, pa, pb)
        xa, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))  # pin
        xa = _issue(a_smem, b_smem, full, c0 + j + 1, xa, WG)
        pa, pb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, j + 1, sa, sb, False)
        xb, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xb, acc))  # block j done
        _release(empty, c0 + j, NUM_STAGES)
        acc = _promote(acc, xb, ca, cb)
        xb, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xb, acc))  # pin
    if n % 2 == 0:
        last = _issue(a_smem, b_smem, full, c0 + n - 1, xb, WG)
        ca, cb = _scales_ahead(as_ptrs, a_mask, bs_ptrs, n - 1, sa, sb, False)
        d, acc = warpgroup_mma_wait(num_outstanding=1, deps=(xa, acc))
        _release(empty, c0 + n - 2, NUM_STAGES)
        acc = _promote(acc, d, pa, pb)
        d, acc = warpgroup_mma_wait(num_outstanding=0, deps=(last, acc))
        _release(empty, c0 + n - 1, NUM_STAGES)
        acc = _promote(acc, d, ca, cb)
    else:
        d, acc = warpgroup_mma_wait(num_outstanding=0, deps=(xa, acc))
        _release(empty, c0 + n - 1, NUM_STAGES)
        acc = _promote(acc, d, pa, pb)
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
        acc = _consume(gl.zeros([HALF, BLOCK_N], gl.float32, mma), a_smem, b_smem, full, empty, n, AS + rows * sasm,
                       m_ok, bs_ptr, sask, sbsk, c0, WG)
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
    _grouped_gemm_ws_kernel[(_sms(a.device), )](
        a_desc, a_s, b_desc, b_s3, out, counts, counts if out_rows is None else out_rows, n, k, a_s.stride(0),
        a_s.stride(1), b_s3.stride(0), b_s3.stride(1), b_s3.stride(2), out.stride(0), out.stride(1), G=g,
        G_P2=triton.next_power_of_2(g), STAGES=STAGES, MAP_ROWS=out_rows is not None, CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG)
    return out
