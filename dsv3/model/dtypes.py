"""Buffers whose dtype is part of their meaning, kept through `model.to(dtype)`.

`Module.to(torch.bfloat16)` casts every floating-point tensor, float8 ones included.  Some buffers
must not follow: the router's balancing bias (updates of 1e-3 vanish in bf16), RoPE's frequencies and
tables (bf16 frequencies put the angles radians off at long positions), and FP8 weights with their fp32
block scales (cast to bf16 they would be read as e4m3 bytes no longer).  Their modules' `_apply` goes
through `keep_dtypes`; device moves still apply."""

from __future__ import annotations

from typing import Callable

from torch import nn


def keep_dtypes(module: nn.Module, names: tuple[str, ...], apply: Callable, fn, recurse: bool) -> nn.Module:
    """`apply(fn, recurse)` (the parent class's `_apply`), then each named buffer back in its old dtype
    on its new device."""
    kept = {name: getattr(module, name) for name in names}
    apply(fn, recurse)
    for name, before in kept.items():
        after = getattr(module, name)
        if before is not None and after.dtype != before.dtype:
            setattr(module, name, before.to(device=after.device))
    return module
