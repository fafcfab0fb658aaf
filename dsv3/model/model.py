"""The DeepSeek-V3 transformer, top to bottom: embedding -> blocks -> norm -> head -> MTP depths.

`model(tokens)` returns the main head's logits.  `model(tokens, return_aux=True)` returns a
`TransformerOutput` that also carries the MTP logits, per-MoE-layer expert loads (for the bias update
and MaxVio) and the sequence-wise balance loss.  Single-device code only: parallelism is applied from
outside (design principle 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .layers import RMSNorm
from .moe import MoE, Experts, Router
from .mtp import MTPModule
from .rope import RotaryEmbedding


@dataclass
class TransformerOutput:
    logits: torch.Tensor  # [B, T, V]: position i predicts token i+1
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, V], position i predicts i+k+1
    expert_loads: torch.Tensor | None = None  # [n_moe_layers (main, then MTP), E] tokens per expert
    balance_loss: torch.Tensor | None = None  # scalar, summed over MoE layers


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_impl: str = "sdpa", experts_impl: str = "grouped"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, i, attn_impl, experts_impl) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_layers + k, attn_impl, experts_impl) for k in range(cfg.num_mtp_layers)
        )
        self.init_weights()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """N(0, std^2) for every weight matrix (report: 0.006), ones for norms, zero balancing bias.
        Seed the global RNG before calling for reproducible weights.  A no-op on the meta device."""
        std = self.cfg.init_std if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, Experts):
                nn.init.normal_(m.w13, 0.0, std)
                nn.init.normal_(m.w2, 0.0, std)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (RMSNorm, RotaryEmbedding)):
                m.reset_parameters()

    def set_impl(self, attn: str | None = None, experts: str | None = None) -> "Transformer":
        """Switch attention core ("sdpa" | "eager") and/or experts path ("grouped" | "loop")."""
        for m in self.modules():
            if attn is not None and hasattr(m, "set_attn_impl"):
                m.set_attn_impl(attn)
            if experts is not None and isinstance(m, MoE):
                m.set_experts_impl(experts)
        return self

    def moe_layers(self) -> list[MoE]:
        """MoE layers in the order of `TransformerOutput.expert_loads` rows: main blocks, then MTP."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if b.is_moe]

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, return_aux: bool = False) -> torch.Tensor | TransformerOutput:
        """tokens [B, T] int64 -> logits [B, T, V] (or a TransformerOutput with return_aux)."""
        t = tokens.shape[1]
        cos, sin = self.rope(torch.arange(t, device=tokens.device))  # [T, R/2] each
        emb = self.embed(tokens)  # [B, T, D]
        h, stats = emb, []
        for layer in self.layers:
            h, s = layer(h, cos, sin)
            stats.append(s)
        h_final = self.norm(h)
        logits = self.head(h_final)
        if not return_aux:
            return logits

        mtp_logits = []
        h_prev = h_final if self.cfg.mtp_hidden_after_norm else h
        for k, mtp in enumerate(self.mtp, start=1):
            n = t - k  # positions that still have an input token k ahead
            if n <= 0:
                break
            h_prev, s = mtp(h_prev[:, :n], emb[:, k:], cos[:n], sin[:n])
            mtp_logits.append(self.head(mtp.head_norm(h_prev)))
            stats.append(s)
        stats = [s for s in stats if s is not None]
        loads = torch.stack([s.load for s in stats]) if stats else None
        # every MoE layer's sequence-wise loss counts once, the MTP block's included, not scaled by the MTP
        # weight lambda: the report does not say how MTP's MoE is balanced (UNCONFIRMED; our choice)
        balance = torch.stack([s.balance_loss for s in stats]).sum() if stats else logits.new_zeros(())
        return TransformerOutput(logits, mtp_logits, loads, balance)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path, **kwargs) -> None:
        """Writes the Hugging Face DeepSeek-V3 layout; see `dsv3.checkpoint.save_pretrained`."""
        from ..checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)
