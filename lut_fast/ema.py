"""The momentum target: an EMA copy of the student's encoder and projector.

Kept in eval mode (BatchNorm uses running statistics, copied by the EMA from
the student's buffers), never receives gradients, sees the whole image.
Momentum follows m(k) = 1 - (1 - m0) * (cos(pi k / K) + 1) / 2, from 0.996 at
step 0 to 1.0 at the last optimizer step; updated once per optimizer step.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from lut_fast.models.vit import pool_patch_tokens


def momentum_at(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    if total_steps <= 0:
        return end
    progress = min(step, total_steps) / total_steps
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


class TargetNetwork(nn.Module):
    def __init__(self, student: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(student.encoder)
        self.projector = copy.deepcopy(student.projector)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TargetNetwork":  # always eval: running BN statistics
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(pool_patch_tokens(self.encoder(images)))

    @torch.no_grad()
    def targets(self, view1: torch.Tensor, view2: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
        """Targets in the order LUT's forward consumes them: t(view 2) [, t(view 1)]."""
        if not symmetric:
            return (self(view2),)
        t = self(torch.cat([view2, view1]))  # eval-mode BN: batching is exact
        return tuple(t.chunk(2))

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s, for parameters and float buffers; integer buffers copied."""
        src = list(student.encoder.parameters()) + list(student.projector.parameters())
        dst = list(self.encoder.parameters()) + list(self.projector.parameters())
        torch._foreach_lerp_(dst, src, 1.0 - momentum)
        src_b = list(student.encoder.buffers()) + list(student.projector.buffers())
        dst_b = list(self.encoder.buffers()) + list(self.projector.buffers())
        for d, s in zip(dst_b, src_b):
            if d.dtype.is_floating_point:
                d.lerp_(s, 1.0 - momentum)
            else:
                d.copy_(s)
