"""One pre-norm decoder block: x + MLA(norm(x)), then x + FFN(norm(x)); the FFN is dense or MoE."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA
from .layers import MLP, RMSNorm
from .moe import MoE, MoEStats


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, attn_impl: str, experts_impl: str):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, attn_impl)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer_id >= cfg.first_k_dense
        self.ffn = MoE(cfg, experts_impl) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if not self.is_moe:
            return x + self.ffn(self.ffn_norm(x)), None
        y, stats = self.ffn(self.ffn_norm(x))
        return x + y, stats
