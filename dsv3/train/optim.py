"""AdamW with the report's betas and weight decay on weight matrices only.

Which parameters the report exempts from decay is UNCONFIRMED; we exempt the 1-D ones (norm weights),
the usual practice.  Fused AdamW on CUDA.  The routing biases are buffers, so never in here.
`TrainConfig.moments = "bf16"` stores the two moments in BF16 as the report does (adamw_bf16.py).
"""

from __future__ import annotations

import torch

from .adamw_bf16 import AdamWBF16Moments
from .config import TrainConfig


def decay_split(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """(decayed, exempt) named parameters, in the optimizer's order: an optimizer state dict's parameter
    indices count through the first list, then the second."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = decay_split(model)
    groups = [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    if cfg.moments == "bf16":
        return AdamWBF16Moments(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.moments != "fp32":
        raise ValueError(f"--moments must be fp32 or bf16, got {cfg.moments!r}")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda")
