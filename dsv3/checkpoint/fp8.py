"""128x128 block-scaled FP8 (e4m3) weights as stored in the released checkpoint (spec §5.3, §3.2).

    W[block] ~= W_fp8[block] * weight_scale_inv[block]       scale_inv = amax(block) / 448

Blocks that do not align with 128 are ceil-divided (576 rows -> 5 row blocks); the partial block's
scale is computed over its real elements (the zero padding cannot raise an amax).  Pure torch: these run
once per tensor at load/save time, not in the hot path.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[R, C] -> zero-padded [R/b, b, C/b, b] view of 128x128 tiles."""
    r, c = w.shape
    pr, pc = -r % block, -c % block
    return torch.nn.functional.pad(w, (0, pc, 0, pr)).view((r + pr) // block, block, (c + pc) // block, block)


def quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] float -> (w_fp8 [R, C] e4m3, scale_inv [ceil(R/b), ceil(C/b)] fp32)."""
    tiles = _blocks(w.float(), block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [R/b, C/b]
    scale_inv = amax / torch.full_like(amax, FP8_MAX)  # IEEE division on CUDA too (a scalar divisor is a reciprocal multiply there)
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    r, c = w.shape
    q = q.reshape(tiles.shape[0] * block, tiles.shape[2] * block)[:r, :c]
    return q.to(FP8_DTYPE).contiguous(), scale_inv


def dequantize_weight(w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: int = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_weight` up to FP8 rounding: per-block multiply by scale_inv, in fp32."""
    r, c = w_fp8.shape
    expected = (-(-r // block), -(-c // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w_fp8.shape)} (expected {expected})")
    s = scale_inv.float().repeat_interleave(block, 0)[:r].repeat_interleave(block, 1)[:, :c]
    return (w_fp8.float() * s).to(dtype)
