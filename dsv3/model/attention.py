"""Multi-head Latent Attention (spec §1.4), in the expanded ("MHA") form used for training and prefill.

    c_q  = RMSNorm(W_DQ h)                       [B, T, q_lora]     (or no compression: q = W_Q h)
    q    = W_UQ c_q  -> per head [q_nope 128 | q_pe 64], q_pe roped
    c_kv, k_pe = split(W_DKV h)                  [B, T, 512], [B, T, 64]; c_kv normalised, k_pe roped
    k    = [W_UK c_kv ; k_pe shared by all heads]    v = W_UV c_kv
    o    = softmax(q k^T * scale) v  -> W_O

`attn_impl` picks the attention core: "sdpa" (torch's fused kernels) or "eager" (explicit fp32 softmax,
the obviously-correct twin).  The absorbed form over a latent cache lives in `dsv3.inference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, module_call, no_autocast
from .rope import apply_rope


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention in fp32 (scores, softmax, product), also under an enclosing bf16 autocast, which
    would otherwise recast the matmuls.  q, k [B, H, T, Dqk]; v [B, H, T, Dv] -> [B, H, T, Dv] in q's dtype."""
    t = q.shape[-2]
    with no_autocast(q):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        return torch.matmul(probs, v.float()).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


ATTENTION_IMPLS = {"eager": eager_attention, "sdpa": sdpa_attention}


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.nope, self.rope, self.dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        d, h = cfg.hidden_size, cfg.num_heads
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(h * cfg.v_head_dim, d, bias=False)
        self.softmax_scale = cfg.softmax_scale
        self.set_attn_impl(attn_impl)

    def set_attn_impl(self, name: str) -> None:
        if name not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {name!r}; choose from {sorted(ATTENTION_IMPLS)}")
        self.attn_impl = name

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  linear=module_call, rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, T, H, nope], q_pe [B, T, H, rope] (roped unless rope=False: for
        callers that rotate it themselves, as the MLA decode kernels do)."""
        q = linear(self.wq_b, self.q_norm(linear(self.wq_a, x))) if self.cfg.q_lora_rank else linear(self.wq, x)
        q = q.unflatten(-1, (self.n_heads, self.nope + self.rope))
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        return q_nope, (apply_rope(q_pe, cos, sin) if rope else q_pe)

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       linear=module_call) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> normalised c_kv [B, T, kv_lora], roped k_pe [B, T, rope]: all a cache needs."""
        c_kv, k_pe = linear(self.wkv_a, x).split([self.cfg.kv_lora_rank, self.rope], dim=-1)
        return self.kv_norm(c_kv), apply_rope(k_pe, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_latent(x, cos, sin)
        kv = self.wkv_b(c_kv).unflatten(-1, (self.n_heads, self.nope + self.dv))  # [B, T, H, nope + dv]
        k_nope, v = kv.split([self.nope, self.dv], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, T, H, 192]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        # [B, T, H, d] -> [B, H, T, d] for the attention core
        o = ATTENTION_IMPLS[self.attn_impl](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale)
        return self.wo(o.transpose(1, 2).reshape(b, t, self.n_heads * self.dv))
