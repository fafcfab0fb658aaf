"""dsv3: DeepSeek-V3-architecture language models in PyTorch."""

from .config import ModelConfig
from .model import Transformer, TransformerOutput


def from_pretrained(path, device=None, dtype=None):
    """Loads a Hugging Face-layout DeepSeek-V3 directory; see `dsv3.checkpoint.from_pretrained`."""
    from .checkpoint import from_pretrained as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["ModelConfig", "Transformer", "TransformerOutput", "from_pretrained"]
__version__ = "0.1.0"
