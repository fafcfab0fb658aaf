"""Auxiliary-loss-free load balancing (spec §1.7): after each optimizer step, per MoE layer,
    b_i <- b_i + gamma * sign(mean_load - load_i)
from the tokens each expert received over the whole step (all micro-batches).  The sign rule is Wang
et al. 2024's (arXiv 2408.15664); the report only says "decrease if overloaded, increase if
underloaded" (UNCONFIRMED detail).  Biases are fp32 buffers, outside the optimizer, with no gradient.
"""

from __future__ import annotations

import torch

from ..model.moe import MoE


@torch.no_grad()
def update_expert_biases(moe_layers: list[MoE], loads: torch.Tensor, gamma: float) -> None:
    """loads [n_moe_layers, E] token counts of this step, rows in `model.moe_layers()` order."""
    if gamma == 0:
        return
    loads = loads.float()
    for moe, load in zip(moe_layers, loads, strict=True):
        if moe.gate.bias is not None:
            moe.gate.bias.add_(gamma * torch.sign(load.mean() - load))
