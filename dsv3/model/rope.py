"""Rotary position embedding for MLA's decoupled 64 dims: YaRN frequencies and interleaved pairs.

DeepSeek rotates *adjacent* pairs (2i, 2i+1) of q_pe / k_pe (spec §1.4, pitfall 1), and the released
weights are laid out for that; Llama's half-split rotation would silently give wrong results.  The
output keeps the interleaved layout, as DeepSeek's official code does.

YaRN (spec §1.5): pairs rotating faster than beta_fast turns over the original context keep their
frequency, those slower than beta_slow are divided by the factor, a linear ramp blends in between.
cos/sin carry YaRN's attention factor (`ModelConfig.rope_attention_factor`), which is 1 for every
DeepSeek release; the mscale^2 on the logits lives in `ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inverse frequencies [rope_dim/2] in fp32, cos/sin scale)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if not cfg.yarn_enabled:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the frequency is kept (extrapolated), 0 where interpolated
    inv_freq = inv_freq / cfg.rope_factor * (1 - keep) + inv_freq * keep
    return inv_freq, cfg.rope_attention_factor


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin [..., T, rope_dim/2] (fp32) for given integer positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Recomputes the non-persistent buffer, e.g. after a model built on the meta device is loaded."""
        self.inv_freq = rope_frequencies(self.cfg)[0].to(device or self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., T, rope_dim/2]
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs of the last dim.  x [B, T, H, R] (per head) or [B, T, R] (shared key);
    cos/sin [T, R/2] or [B, T, R/2].  Math in fp32, result in x's dtype."""
    if x.dim() == 4:  # broadcast over the heads dim between T and R
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., R/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
