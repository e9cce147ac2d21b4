"""The two loss terms, each in one short function.

total = mae_pixel_loss(view 1) + lambda * bc_loss     (docs/METHOD.md, "5. Losses")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mae_pixel_loss(target_patches: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MSE on masked patches only; with ``norm_pix`` each target patch is (x - mean) / sqrt(var + 1e-6).

    target_patches, pred: (B, L, p*p*3); mask: (B, L), 1 = masked.
    """
    target = target_patches.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def bc_loss(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Broader-contextualisation loss: 2 - 2 cos(q, stopgrad(t)), mean over the batch."""
    q = F.normalize(q.float(), dim=-1)
    t = F.normalize(t.detach().float(), dim=-1)
    return (2 - 2 * (q * t).sum(dim=-1)).mean()
