"""The training objective (spec §1.8, §1.9): next-token CE + (lambda / D) * sum_k MTP CE_k + balance loss.

Each MTP depth's CE is averaged over the positions that have a target (T - k of them), where the
report divides by T; the difference is k/T, negligible at training lengths.  The total's composition
beyond "additional objective" is UNCONFIRMED in the report; this is the plain sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import TransformerOutput


def training_loss(out: TransformerOutput, targets: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """out from model(inputs, return_aux=True); targets [B, T] (inputs shifted by one).
    Returns (total loss, detached parts: main / mtp / balance)."""
    main = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    total = main + out.balance_loss
    parts = {"loss": main.detach(), "balance_loss": out.balance_loss.detach()}
    if out.mtp_logits:
        # depth k at position i predicts token i+k+1 = targets[:, i+k]
        mtp = torch.stack([
            F.cross_entropy(logits.flatten(0, 1).float(), targets[:, k:].flatten())
            for k, logits in enumerate(out.mtp_logits, start=1)
        ])
        total = total + mtp_weight * mtp.mean()
        parts["mtp_loss"] = mtp.mean().detach()
    return total, parts
