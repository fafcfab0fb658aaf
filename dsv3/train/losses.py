"""The training objective (spec §1.8, §1.9): next-token CE + (lambda / D) * sum_k MTP CE_k + balance loss.

Each MTP depth's CE is averaged over the positions that have a target (T - k of them), where the
report divides by T; the difference is k/T, negligible at training lengths.  The total's composition
beyond "additional objective" is UNCONFIRMED in the report; this is the plain sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import TransformerOutput


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


_compiled_ce = None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE in fp32 maths.  Compiled on CUDA: one fused kernel reads the BF16 logits, where eager
    would first write an fp32 copy of the [B, T, V] tensor."""
    global _compiled_ce
    if logits.device.type != "cuda":
        return _cross_entropy(logits, targets)
    if _compiled_ce is None:
        _compiled_ce = torch.compile(_cross_entropy)
    return _compiled_ce(logits, targets)


def training_loss(out: TransformerOutput, targets: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """out from model(inputs, return_aux=True); targets [B, T] (inputs shifted by one).
    Returns (total loss, detached parts: main / mtp / balance)."""
    main = lm_loss(out.logits, targets)
    total = main + out.balance_loss
    parts = {"loss": main.detach(), "balance_loss": out.balance_loss.detach()}
    if out.mtp_logits:
        # depth k at position i predicts token i+k+1 = targets[:, i+k]
        mtp = torch.stack([
            lm_loss(logits, targets[:, k:])
            for k, logits in enumerate(out.mtp_logits, start=1)
        ])
        total = total + mtp_weight * mtp.mean()
        parts["mtp_loss"] = mtp.mean().detach()
    return total, parts
