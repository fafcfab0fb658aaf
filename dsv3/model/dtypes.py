"""Buffers whose dtype is part of their meaning, held in it through `model.to(dtype)`.

`Module.to(torch.bfloat16)` casts every floating-point tensor, float8 ones included.  Some buffers
must not follow: the router's balancing bias (updates of 1e-3 vanish in bf16), RoPE's frequencies and
tables (bf16 frequencies put the angles radians off at long positions), and FP8 weights with their fp32
block scales (cast to bf16 they would be read as e4m3 bytes no longer).  Their modules' `_apply` goes
through `keep_dtypes`; device moves still apply."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def keep_dtypes(module: nn.Module, dtypes: dict[str, torch.dtype], apply: Callable, fn, recurse: bool) -> nn.Module:
    """`apply(fn, recurse)` (the parent class's `_apply`) with each named buffer ending in its given dtype
    on the device fn moves it to.  A buffer that fn would cast elsewhere sits out the cast and is moved on
    its own: an FP8 expert stack is never materialised in bf16, even for a moment."""
    held = {}
    for name, dtype in dtypes.items():
        buf = module._buffers.get(name)
        if buf is None:
            continue
        target = fn(buf.reshape(-1)[:0])  # an empty probe: where and as what fn puts the buffer, without a copy
        if target.dtype != dtype:
            held[name] = (buf, target.device)
            module._buffers[name] = None  # Module._apply skips None buffers
    try:
        apply(fn, recurse)
    finally:
        for name, (buf, device) in held.items():
            module._buffers[name] = buf.to(device=device, dtype=dtypes[name])
    return module
