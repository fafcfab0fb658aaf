"""Registering our decode kernels as torch ops, with or without Triton installed.

CUDA builds of torch ship Triton; CPU-only builds do not, and there the kernels' rules never hold (they
need CUDA), so only the torch twins run.  `torch.library.triton_op` still scans the op's body for
Triton kernels when it is registered and, without Triton, logs "Triton not available" once per op on
every import.  Without Triton the ops are registered as plain custom ops instead: same name and
signature, never called.
"""

from __future__ import annotations

import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()):
    """Decorator: `torch.library.triton_op(name)` where Triton is installed, else a custom op (never called).
    mutates_args: the arguments the kernels write into (e.g. the latent cache), which the op must declare."""
    if HAVE_TRITON:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)
