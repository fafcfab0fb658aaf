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
from .dtypes import keep_dtypes


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
    """Computes cos/sin [..., T, rope_dim/2] (fp32) for given integer positions.

    `forward` evaluates the angles (training and the full forward: arange(T), any T); `lookup` reads the
    same values from fp32 tables [max_position_embeddings, rope_dim/2] built once by that formula.  Why
    the tables: the decode kernels (latent_small, mla_decode) index them by each row's position, so a
    compiled decode step computes no cos/sin of its own (it took 4 small launches per step).  Memory:
    P x R/2 x 8 bytes for both: 1 MB for the bench config (4,096 positions), 42 MB at V3's 163,840.

    The frequencies and the tables stay fp32 when the module is cast (model.to(bfloat16)), as DeepSeek's
    reference keeps them: bf16-rounded frequencies put the angles at position 4,000 up to 1.7 radians off.
    Device moves still apply.  All three are derived, not weights: non-persistent buffers, rebuilt by
    `reset_parameters` (which must follow `Module.to_empty`: that leaves them uninitialised)."""

    _FP32_BUFFERS = ("inv_freq", "cos_table", "sin_table")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, sin = self.forward(torch.arange(cfg.max_position_embeddings))
        self.register_buffer("cos_table", cos, persistent=False)  # [P, rope_dim/2]
        self.register_buffer("sin_table", sin, persistent=False)

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Recomputes the non-persistent buffers, e.g. after a model built on the meta device is loaded."""
        device = device or self.inv_freq.device
        self.inv_freq = rope_frequencies(self.cfg)[0].to(device)
        self.cos_table, self.sin_table = self.forward(torch.arange(self.cfg.max_position_embeddings, device=device))

    def _apply(self, fn, recurse=True):
        # the fp32 buffers stay fp32 when the module is cast (see the class docstring); device moves apply
        return keep_dtypes(self, dict.fromkeys(self._FP32_BUFFERS, torch.float32), super()._apply, fn, recurse)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., T, rope_dim/2]
        return angles.cos() * self.scale, angles.sin() * self.scale

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [..., T, rope_dim/2] (fp32): the tables' rows at integer positions, which are meant to lie
        below max_position_embeddings P; a negative position counts from the end, as Python indexing does.
        Outside [-P, P) the first or last row: decoding does step rows past the context (a ragged batch's
        finished sequences keep stepping, a speculative step drafts past the end), whose outputs are never
        kept but must not fault.  The decode kernels index the tables the same way."""
        p = self.cos_table.shape[0]
        rows = positions.clamp(-p, p - 1)
        return self.cos_table[rows], self.sin_table[rows]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs of the last dim.  x [B, T, H, R] (per head) or [B, T, R] (shared key);
    cos/sin [T, R/2] or [B, T, R/2].  Math in fp32, result in x's dtype."""
    if x.dim() == 4:  # broadcast over the heads dim between T and R
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., R/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
