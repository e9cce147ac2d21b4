"""AdamW with the MAE/LUT parameter groups, the lr scaling rule and the lr schedule."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay


def scaled_lr(blr: float, eff_batch: int, rule: str = "sqrt") -> float:
    """Official LUT: blr * sqrt(B) / 4; MAE: blr * B / 256. Both give 2.4e-3 for blr 1.5e-4 at B = 4096."""
    if rule == "sqrt":
        return blr * math.sqrt(eff_batch) / 4
    if rule == "linear":
        return blr * eff_batch / 256
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up, then half-cycle cosine to ``min_lr``; evaluated every optimizer step."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas, fused: bool) -> torch.optim.AdamW:
    """No weight decay on biases and 1-D parameters (norms); frozen tensors (sin-cos positions) excluded."""
    groups = param_groups_weight_decay(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)
