"""AdamW with the report's betas and weight decay on weight matrices only.

Which parameters the report exempts from decay is UNCONFIRMED; we exempt the 1-D ones (norm weights),
the usual practice.  Fused AdamW on CUDA.  The routing biases are buffers, so never in here.
"""

from __future__ import annotations

import torch

from .config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda")
