"""LUT: MAE plus a cosine loss toward a momentum target that sees the whole other view.

The target (``ema.TargetNetwork``) is this task's, not the student's: it runs
under no_grad before the student's forward, is updated by EMA after each
optimizer step, and stays outside DDP and the optimizer.

lambda = 0 is decided here and only here: no target is built, the student's
forward is then exactly MAE's, its heads get no gradient, so DDP must look for
unused parameters.
"""

from __future__ import annotations

import torch

from lut_fast.ema import TargetNetwork, momentum_at
from lut_fast.models import LUT, build_model
from lut_fast.tasks.base import Task


class LUTTask(Task):
    name = "lut"
    views = 2
    baseline = "mae"  # what lambda = 0 trains
    sync_batchnorm = True  # BatchNorm in the heads over the global batch (docs/METHOD.md, "7. BatchNorm in the heads")

    def __init__(self, model: LUT, momentum_start: float = 0.996, momentum_end: float = 1.0):
        super().__init__(model)
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.target: TargetNetwork | None = TargetNetwork(model) if model.lam > 0 else None

    @classmethod
    def from_config(cls, cfg) -> "LUTTask":
        return cls(build_model(cfg), cfg.lut.ema_momentum, cfg.lut.ema_momentum_end)

    @property
    def find_unused_parameters(self) -> bool:
        return self.target is None  # lambda = 0: projector and predictor never used

    def losses(self, forward, view1, view2, noise) -> dict[str, torch.Tensor]:
        targets = self.target.targets(view1, view2, self.model.symmetric) if self.target is not None else None
        return forward(view1, view2, noise, targets)

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        m = momentum_at(step, total_steps, self.momentum_start, self.momentum_end)
        if self.target is not None:
            self.target.update(self.model, m)
        return {"momentum": m}

    def to(self, device: torch.device) -> "LUTTask":
        super().to(device)
        if self.target is not None:
            self.target.to(device)
        return self

    def compile(self) -> None:
        if self.target is not None:
            self.target.compile()  # in place: the target's full-image passes are a large share of LUT's FLOPs

    def training_flops_per_image(self, cfg) -> float:
        if self.target is None:  # lambda = 0: the student's forward is its baseline's, and there is no target pass
            from lut_fast.flops import ArchDims, training_flops

            return float(training_flops(ArchDims.from_config(cfg), self.baseline).total)
        return super().training_flops_per_image(cfg)

    def init_weights(self, path: str) -> str:
        line = super().init_weights(path)
        if self.target is not None:  # the target starts as a copy of the (new) student, as in a fresh run
            self.target = TargetNetwork(self.model)
        return line

    def extra_state(self) -> dict:
        return {"target": self.target.state_dict() if self.target is not None else None}

    def load_extra_state(self, checkpoint: dict) -> None:
        if self.target is not None:
            self.target.load_state_dict(checkpoint["target"])

    def replicated_tensors(self) -> list[torch.Tensor]:
        if self.target is None:
            return []
        return list(self.target.parameters()) + list(self.target.buffers())
