"""The MoE layer for generation: the model's own router, experts and dispatcher, minus host syncs.

`MoE.forward` counts tokens per expert with `torch.bincount`, which on CUDA reads the maximum back to
the host; a host sync cannot be captured in a CUDA graph and stalls the CPU every layer.  Here the
counts come from a scatter-add into a fixed-size vector instead, and the balance statistics that only
training needs are skipped.  Everything else is the model's code, so `tests/test_inference.py` holds
this equal to `MoE.forward`.

Not here: a separate small-batch kernel.  At batch 1 the grouped GEMM gets 8 non-empty groups; empty
groups have no tiles, so it should read only those experts' weights (the byte-minimal pattern; not
yet confirmed by a profile).
"""

from __future__ import annotations

import torch

from ..model.moe import MoE


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] -> [B, T, D], without host synchronisation where grouped GEMMs exist (CPU; CUDA BF16)."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    r = moe.gate(flat)
    experts = r.indices.flatten()  # [N*K]
    order = experts.argsort(stable=True)
    counts = torch.zeros(moe.cfg.n_routed_experts, dtype=torch.long, device=x.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))  # bincount without its host sync
    rows = flat[order // r.indices.shape[1]]  # [N*K, D] token copies sorted by expert
    out = moe.dispatcher.combine(moe.experts.forward_grouped(rows, counts), r.weights, order).view(b, t, d)
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out
