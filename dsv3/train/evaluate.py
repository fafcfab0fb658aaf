"""Validation: mean next-token loss (nats) over held-out windows, and bits per byte."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import iter_eval
from ..data.packing import num_windows


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None,
             device: torch.device, autocast_dtype: torch.dtype | None = None, micro_batch: int | None = None) -> float:
    """Token-weighted mean CE of the main head over the first `max_batches` batches of `tokens`; each
    batch runs `micro_batch` sequences per forward (the training run's --micro-batch-size: a run that
    needs gradient accumulation to fit has no room for a whole batch's logits either).  The windows
    scored, and so the loss, do not depend on micro_batch."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch_inputs, batch_targets in iter_eval(tokens, batch_size, seq_len, max_batches):
        for inputs, targets in zip(batch_inputs.split(micro_batch or batch_size), batch_targets.split(micro_batch or batch_size)):
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


def scored_text(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None,
                byte_lengths: np.ndarray) -> tuple[int, int]:
    """(targets, UTF-8 bytes of their text) that `evaluate` scores with these arguments: the windows it
    reads are consecutive, so its targets are tokens[1 : 1 + windows * seq_len].  bits_per_byte of the
    loss over exactly these, where the whole split's token/byte ratio is off by as much as the scored
    part's text differs from the rest.  byte_lengths: `Tokenizer.byte_lengths` (special tokens 0)."""
    windows = num_windows(len(tokens), seq_len)
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    targets = np.asarray(tokens[1:1 + windows * seq_len])
    return len(targets), int(byte_lengths[targets].sum())
