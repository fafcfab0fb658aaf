"""Multi-token prediction module (spec §1.9): one extra transformer block per prediction depth.

Depth k combines the previous depth's hidden state h^{k-1}_i with the embedding of token i+k:
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      embedding FIRST, as in the released
                                                                  weights (opposite to the report's notation)
    h^k  = Block(h')  over the shortened sequence of T-k positions, causal
    logits^k_i = Head(head_norm(h^k_i))  predicts token i+k+1
The embedding and the output head are the main model's (shared, not copied).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .layers import RMSNorm
from .moe import MoEStats


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, attn_impl: str, experts_impl: str):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, layer_id, attn_impl, experts_impl)
        self.head_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_ahead: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        """h_prev [B, T', D] (positions i), emb_ahead [B, T', D] (embeddings of tokens i+k) -> h^k [B, T', D]."""
        x = self.eh_proj(torch.cat([self.enorm(emb_ahead), self.hnorm(h_prev)], dim=-1))
        return self.block(x, cos, sin)
