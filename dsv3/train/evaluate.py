"""Validation: mean next-token loss (nats) over held-out windows, and bits per byte."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import iter_eval


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None,
             device: torch.device, autocast_dtype: torch.dtype | None = None) -> float:
    """Token-weighted mean CE of the main head over the first `max_batches` batches of `tokens`."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for inputs, targets in iter_eval(tokens, batch_size, seq_len, max_batches):
        inputs, targets = inputs.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
        count += targets.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError(f"validation split of {len(tokens)} tokens is shorter than one sequence of {seq_len + 1}")
    return (total / count).item()


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Nats per token -> bits per UTF-8 byte of the text those tokens encode."""
    return loss_nats / math.log(2) * n_tokens / n_bytes
