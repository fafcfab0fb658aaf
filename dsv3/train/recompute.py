"""Activation recomputation, applied from outside the model: each block's forward runs under
`torch.utils.checkpoint`, so only block inputs are kept and the rest is recomputed in backward."""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from ..model import Transformer


def enable_recompute(model: Transformer) -> None:
    for block in list(model.layers) + [m.block for m in model.mtp]:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
