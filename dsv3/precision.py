"""The precision policy, in one place and printed at start (design principle 10).

BF16 runs keep fp32 master weights, gradients and AdamW moments, and compute matmuls and attention
under BF16 autocast; RMSNorm, softmax, the router GEMM, losses and the routing bias stay fp32 (the
report keeps embedding, head, router, norms and the attention core out of FP8 for the same reasons).
"""

from __future__ import annotations

import torch

POLICY = {
    "fp32": {"autocast": None, "master": "fp32", "matmuls": "fp32", "attention": "fp32"},
    "bf16": {"autocast": torch.bfloat16, "master": "fp32", "matmuls": "bf16", "attention": "bf16 in, fp32 softmax"},
}
ALWAYS_FP32 = "RMSNorm math, router GEMM + sigmoid, routing bias, softmax, losses, optimizer moments"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in POLICY:
        raise ValueError(f"unknown precision {precision!r}; choose from auto, {', '.join(POLICY)}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return POLICY[precision]["autocast"]


def describe(precision: str) -> str:
    p = POLICY[precision]
    return (f"precision {precision}: master weights {p['master']}, matmuls {p['matmuls']}, attention {p['attention']}; "
            f"always fp32: {ALWAYS_FP32}")


def prepare_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Model changes a precision needs before training (none for fp32/bf16: autocast does the work)."""
    return model
