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


# config.json's `quantization_config` of the released checkpoint; any other value is refused on load
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def check_quantization_config(hf_config: dict) -> None:
    """Refuses a `quantization_config` other than DeepSeek-V3's block-wise e4m3 (absent means unquantised;
    `scale_fmt`, which only concerns activations, is `fp8.inference`'s business)."""
    q = hf_config.get("quantization_config")
    if not q:
        return
    wrong = [f"{key} {q[key]!r}" for key, want in FP8_QUANT_CONFIG.items()
             if key in q and (list(q[key]) if key == "weight_block_size" else q[key]) != want]
    if wrong:
        raise ValueError(f"quantization_config: {', '.join(wrong)} is not supported; dsv3 reads DeepSeek-V3's FP8 "
                         f"({', '.join(f'{k} {v!r}' for k, v in FP8_QUANT_CONFIG.items())})")


def dequantize_named(name: str, w_fp8: torch.Tensor, scale_inv: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint tensor with its scale -> dtype; errors name the tensor.  Only e4m3 with a scale is FP8 here."""
    if w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: dtype {w_fp8.dtype} with a weight_scale_inv; dsv3 reads e4m3 (float8_e4m3fn) FP8 weights only")
    if scale_inv is None:
        raise ValueError(f"{name}: FP8 tensor without its weight_scale_inv")
    try:
        return dequantize_weight(w_fp8, scale_inv, dtype)
    except ValueError as e:
        raise ValueError(f"{name}: {e}; the scales must cover {BLOCK}x{BLOCK} blocks") from e


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[R, C] -> zero-padded [R/b, b, C/b, b] view of 128x128 tiles."""
    r, c = w.shape
    pr, pc = -r % block, -c % block
    return torch.nn.functional.pad(w, (0, pc, 0, pr)).view((r + pr) // block, block, (c + pc) // block, block)


def quantize_weight(w: torch.Tensor, block: int = BLOCK, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] float -> (w_fp8 [R, C] e4m3, scale_inv [ceil(R/b), ceil(C/b)] fp32).  pow2: scales rounded up
    to powers of two (V3.1's `scale_fmt: ue8m0`); weights dequantised from such a checkpoint then
    quantise back to the same bytes, which amax/448 scales would not give."""
    tiles = _blocks(w.float(), block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [R/b, C/b]
    scale_inv = amax / torch.full_like(amax, FP8_MAX)  # IEEE division on CUDA too (a scalar divisor is a reciprocal multiply there)
    if pow2:
        scale_inv = torch.exp2(torch.ceil(torch.log2(scale_inv)))
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
