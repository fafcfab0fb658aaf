"""Registering our decode kernels as torch ops, with or without Triton installed.

CUDA builds of torch ship Triton; CPU-only builds do not, and there the kernels' rules never hold (they
need CUDA), so only the torch twins run.  `torch.library.triton_op` still scans the op's body for
Triton kernels when it is registered and, without Triton, logs "Triton not available" once per op on
every import.  Without Triton the ops are registered as plain custom ops instead: same name and
signature, never called.

Programmatic dependent launch (PDL, Hopper and later), behind `DSV3_PDL=1` read at import: every decode
kernel is then launched with `launch_pdl=True` and starts with `await_previous_kernel`, so a kernel's
launch and prologue overlap the end of the one before it in the stream (and in a captured CUDA graph)
instead of following it after the launch gap (~0.57 us x 86 kernels in a bs1 step, H200 run 12).
Inductor's user-kernel launcher has no launch_pdl option (torch 2.11-2.13), so with PDL on the ops are
opaque custom ops whose bodies launch the kernels themselves; their fake is the same body, which then
only allocates the outputs.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

HAVE_TRITON = importlib.util.find_spec("triton") is not None
# 0 off; 1 wait, then let the next kernel launch; 2 wait only (the next launches as this one's programs end)
PDL_MODE = int(os.environ.get("DSV3_PDL", "0")) if HAVE_TRITON else 0
PDL = PDL_MODE > 0

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def await_previous_kernel(PDL: tl.constexpr):
        """A kernel's first step: with PDL, wait until the kernel before it has finished and its writes are
        visible, then let the next kernel launch (its programs wait in turn, so at most two overlap)."""
        if PDL > 0:
            gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()
else:

    def await_previous_kernel(PDL):  # never called: without Triton no kernel runs
        pass


class _Launcher:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            if not PDL:
                return torch.library.wrap_triton(self.kernel)[grid](*args, PDL=0, **kwargs)
            if any(isinstance(a, FakeTensor) for a in args):
                return None  # the op's fake: its body allocated the outputs, nothing to launch
            return self.kernel[grid](*args, PDL=PDL_MODE, launch_pdl=True, **kwargs)

        return call


def launch(kernel) -> _Launcher:
    """`launch(kernel)[grid](*args, **meta)`: `wrap_triton(kernel)[grid]` with the kernel's `PDL` constexpr
    set, or, with PDL on, a direct launch with `launch_pdl=True`."""
    return _Launcher(kernel)


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()):
    """Decorator: `torch.library.triton_op(name)` where Triton is installed, else a custom op (never called).
    mutates_args: the arguments the kernels write into (e.g. the latent cache), which the op must declare."""
    if HAVE_TRITON and not PDL:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    if not PDL:
        return torch.library.custom_op(name, mutates_args=mutates_args)

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fn)
        return op

    return register
