"""Programmatic dependent launch (PDL, Hopper and later) for our decode kernels.

Why: the batch-1 decode step of the `bench` config ran 703 µs of kernels (149 of them, profiled
without a graph) in a 951 µs graph-replayed step (H200, 2026-12-01,
bench/results/decode_2026-12-01_run5_mla.json): about a quarter of the step looks like time between
kernels (bench/decode.py's `timeline` section measures it inside the graph).  With PDL a kernel is
launched while the one ahead of it still runs (once that one has let it: Inductor's PDL kernels do so
after their loads); its programs start and wait in-kernel (`griddepcontrol.wait`) until the previous
kernel's writes are visible.  The launch and the programs' start-up then overlap the previous kernel
instead of following it.

Weights first: a GEMV's weights (and the router's) do not depend on the kernel ahead of it, so before
waiting each GEMV program asks the TMA unit to pull its contiguous slice of weight rows into L2
(`cp.async.bulk.prefetch.L2`, sm_90: one instruction, no registers, nothing to wait for); its loop then
reads them from L2.  The stream of weights starts while the previous kernel finishes.

Which: the decode kernels on by default (gemv.py's single and paired GEMVs, moe_small.py's slot-major
and expert-major experts, route_small.py's routing); not the MLA kernels (off by default).

How: each of those kernels takes a `PDL` constexpr and calls `pdl_enter` (GEMVs and routing:
`pdl_enter_prefetching`) before its first load; with PDL_KERNELS set (off until a GPU run times it:
bench/decode.py's `pdl_kernels` section) the ops launch it with `launch_pdl=True`. Inductor cannot pass
that launch option to a user kernel (`wrap_triton` launches carry only warps and stages), so that launch
goes through an opaque `torch.library.custom_op` that calls the Triton kernel itself; compiled steps
call it as an extern op, and a CUDA graph capture records the launch with its attribute. Only on CUDA
(the interpreter has no griddepcontrol). Inductor's own kernels take PDL from `compiled.INDUCTOR_PDL`. A
kernel gets going early only when the one ahead of it lets it (a kernel without PDL, or one of ours, does
so only as it exits), so the two switches are meant together (bench/decode.py's `pdl_all` section).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only torch builds ship without Triton

    def _jit(fn):
        return fn


PDL_KERNELS = False  # read at trace time: set it before the first generate
PREFETCH_L2 = True  # with PDL_KERNELS: GEMVs and routing prefetch their weights before the wait


def launch_options(pdl: bool) -> dict:
    """The extra launch options of a kernel launched with PDL on."""
    return {"launch_pdl": True} if pdl else {}


@_jit
def pdl_enter(PDL: tl.constexpr):
    """First thing in a kernel: wait for the previous kernel's writes.  Every load and store of this
    kernel comes after the wait.  These kernels never release their dependents early
    (`gdc_launch_dependents`): the next kernel launches as this one exits.  An early release would
    let an Inductor PDL kernel start while this one still writes, and Inductor waits only when it
    reads what the node just ahead of it wrote, which it may not see through an opaque op's tuple
    outputs."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@_jit
def prefetch_l2(ptr, nbytes):
    """Thread 0 of the program asks for [ptr, ptr + nbytes) in L2 (16-byte aligned, a multiple of 16
    bytes): `cp.async.bulk.prefetch.L2.global`, a hint with no result and no completion to wait for."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr.to(tl.int64, bitcast=True), nbytes], dtype=tl.int32, is_pure=False, pack=1)


@_jit
def pdl_enter_prefetching(PDL: tl.constexpr, PREFETCH: tl.constexpr, ptr, nbytes):
    """pdl_enter, with [ptr, ptr + nbytes) (this program's weights, never written) requested into L2
    before the wait."""
    if PDL:
        if PREFETCH:
            prefetch_l2(ptr, nbytes)
        tl.extra.cuda.gdc_wait()


def can_prefetch(w, row_bytes: int) -> bool:
    """PREFETCH_L2 is set and whole rows of w can be prefetched: the base and every row start 16-byte
    aligned."""
    return PREFETCH_L2 and w.data_ptr() % 16 == 0 and row_bytes % 16 == 0
