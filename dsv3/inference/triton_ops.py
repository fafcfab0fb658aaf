"""Registering our decode kernels as torch ops, with or without Triton installed.

CUDA builds of torch ship Triton; CPU-only builds do not, and there the kernels' rules never hold (they
need CUDA), so only the torch twins run.  `torch.library.triton_op` still scans the op's body for
Triton kernels when it is registered and, without Triton, logs "Triton not available" once per op on
every import.  Without Triton the ops are registered as plain custom ops instead: same name and
signature, never called.

Programmatic dependent launch (PDL, Hopper and later): a decode kernel over at most `PDL_MAX_ROWS` rows is
launched with `launch_pdl=True` and starts with `await_previous_kernel`, so its launch overlaps the end of
the kernel before it in the stream (and in a captured CUDA graph) instead of following it after the
launch gap (~0.57 us x 86 kernels in a bs1 step, H200 run 12).  H200, bench config, 2026-12-02, same
lease: bs1 1,607.6 and 1,616.4 tok/s with PDL against 1,508.3 and 1,510.8 without (+6.9 %); letting the
next kernel launch early as well (griddepcontrol.launch_dependents after the wait) gave 1,585.5, and that
with the GEMVs prefetching their weights into L2 before the wait 1,520.6 against 1,616.4 (run 14).  At bs8
and bs64 it cost 2.7 % and 1.7 % (6,473.6 against 6,652.6; 40,459.9 against 41,168.1), hence the row limit;
at bs2 (and so MTP's two-row verify steps) it gains: 2,591.2 against 2,449.3 tok/s (+5.8 %, run 14), and
MTP's batch-1 decode phase 1,439.1 against 1,421.4.
Inductor's user-kernel launcher has no launch_pdl option (torch 2.11-2.13), so each op is registered twice:
a triton_op (inductor traces it and launches its kernels) and, for calls with PDL, an opaque custom op
`<name>_pdl` whose body launches the kernels itself (its fake is the same body, which then only allocates
the outputs).  A call picks one by its rows (its first argument's leading dim): the opaque op is what PDL
costs beyond the wait, 3.4 % at bs8 in one lease (6,385.3 tok/s against 6,607.0 as triton_ops, H200,
2026-12-02), so launches without PDL stay triton_ops.  `DSV3_PDL=0` (read at import) turns PDL off.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import threading

import torch
from torch._subclasses.fake_tensor import FakeTensor

HAVE_TRITON = importlib.util.find_spec("triton") is not None
PDL = HAVE_TRITON and os.environ.get("DSV3_PDL", "1") != "0"
PDL_MAX_ROWS = 2  # launches over more rows (tokens) go without PDL (see the module docstring's figures)

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_wait

    @triton.jit
    def await_previous_kernel(PDL: tl.constexpr):
        """A kernel's first step that reads or writes memory.  With PDL: wait until the kernel before has
        finished and its writes are visible (the launch and what came before this call overlapped that
        kernel's end)."""
        if PDL:
            gdc_wait()
else:

    def await_previous_kernel(PDL):  # never called: without Triton no kernel runs
        pass


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device, rows: int) -> bool:
    """Whether a launch over `rows` rows on `device` goes with PDL (on, few rows, a Hopper or later GPU)."""
    return PDL and rows <= PDL_MAX_ROWS and device.type == "cuda" and _has_pdl(device.index or 0)


_opaque = threading.local()  # .active: inside an opaque op's body (or its fake), which launches the kernels itself


class _Launcher:
    def __init__(self, kernel, rows: int):
        self.kernel, self.rows = kernel, rows

    def __getitem__(self, grid):
        def call(first, *args, **kwargs):
            if not getattr(_opaque, "active", False):  # a triton_op's body: inductor traces and launches the kernel
                return torch.library.wrap_triton(self.kernel)[grid](first, *args, PDL=False, **kwargs)
            if isinstance(first, FakeTensor):
                return None  # the opaque op's fake: its body allocated the outputs, nothing to launch
            if use_pdl(first.device, self.rows):
                return self.kernel[grid](first, *args, PDL=True, launch_pdl=True, **kwargs)
            return self.kernel[grid](first, *args, PDL=False, **kwargs)

        return call


def launch(kernel, rows: int) -> _Launcher:
    """`launch(kernel, rows)[grid](first_tensor, *args, **meta)`: the kernel over `rows` rows (tokens) with its
    `PDL` constexpr set: inside an opaque op launched directly, with PDL where `use_pdl`; elsewhere through
    `wrap_triton`, so inductor launches it."""
    return _Launcher(kernel, rows)


def _launching_itself(fn):
    """fn as the body of an opaque op: its launches go straight to the kernels (same signature, for the schema)."""

    @functools.wraps(fn)
    def body(*args, **kwargs):
        _opaque.active = True
        try:
            return fn(*args, **kwargs)
        finally:
            _opaque.active = False

    body.__signature__ = inspect.signature(fn, eval_str=True)  # annotations resolved in fn's module, for the schema
    return body


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()):
    """Decorator: `torch.library.triton_op(name)` where Triton is installed; with PDL also the opaque custom op
    `<name>_pdl`, and the decorated name becomes a function that calls the opaque op where its rows (the first
    argument's leading dim) go with PDL, the triton_op elsewhere.  Without Triton a custom op (never called).
    mutates_args: the arguments the kernels write into (e.g. the latent cache), which the ops must declare."""
    if not HAVE_TRITON:
        return torch.library.custom_op(name, mutates_args=mutates_args)
    traced = torch.library.triton_op(name, mutates_args=mutates_args)
    if not PDL:
        return traced

    def register(fn):
        by_inductor = traced(fn)
        itself = torch.library.custom_op(f"{name}_pdl", mutates_args=mutates_args)(_launching_itself(fn))
        itself.register_fake(_launching_itself(fn))

        @functools.wraps(fn)
        def call(first, *args, **kwargs):
            op = itself if use_pdl(first.device, first.shape[0]) else by_inductor
            return op(first, *args, **kwargs)

        return call

    return register
