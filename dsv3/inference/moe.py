"""The MoE layer for generation: the model's router, dispatcher and experts, without training statistics.

`MoE.forward` also returns what only training needs (per-expert load for the bias update, the
sequence-wise balance loss in train mode); generation skips those kernels.  Routing, dispatch (the
expert-parallel seam) and the grouped expert GEMMs are the model's own calls, with no host sync where
grouped GEMMs exist (CPU; CUDA BF16), so a decode step stays capturable in a CUDA graph.
`tests/test_inference.py` holds this equal to `MoE.forward`.

Not here: a separate small-batch kernel.  At batch 1 the grouped GEMM gets 8 non-empty groups; empty
groups have no tiles, so it should read only those experts' weights (the byte-minimal pattern; not
yet confirmed by a profile).
"""

from __future__ import annotations

import torch

from ..model.moe import MoE


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] -> [B, T, D]."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    r = moe.gate(flat)
    rows, counts, order = moe.dispatcher.dispatch(flat, r.indices)  # token copies sorted by expert
    out = moe.dispatcher.combine(moe.experts.forward_grouped(rows, counts), r.weights, order).view(b, t, d)
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out
