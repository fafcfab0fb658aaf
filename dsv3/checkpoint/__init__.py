"""Hugging Face checkpoint interop: the name map, FP8 block scales, and safetensors reading/writing."""

from .fp8 import dequantize_weight, quantize_weight
from .hf_io import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained", "quantize_weight", "dequantize_weight"]
