"""MAE: reconstruct the masked patches of one view; nothing to do between optimizer steps."""

from __future__ import annotations

import torch

from lut_fast.models import build_model
from lut_fast.tasks.base import Task


class MAETask(Task):
    name = "mae"
    views = 1

    @classmethod
    def from_config(cls, cfg) -> "MAETask":
        return cls(build_model(cfg))

    def losses(self, forward, view1, view2, noise) -> dict[str, torch.Tensor]:
        return forward(view1, None, noise, None)
