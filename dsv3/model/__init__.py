"""Single-device DeepSeek-V3 model code (no process groups here; parallelism is applied from outside)."""

from .model import Transformer, TransformerOutput

__all__ = ["Transformer", "TransformerOutput"]
