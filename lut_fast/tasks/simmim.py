"""SimMIM and LUT on SimMIM as tasks (models: ``lut_fast/models/simmim.py``).

Both draw their masking noise per *mask block* (one value per block of
``model.mask_patch_size`` pixels) instead of per patch; the model turns it into
block masks on the device (``masking.block_mask``). The draw uses the same
(seed, micro-step) generator as MAE's and LUT's noise, for the global batch.

``LUTSimMIMTask`` is LUT's task with a SimMIM student: the same momentum target
(EMA encoder + projector on the whole other view), EMA schedule, synchronised
BatchNorm in the heads, checkpointed target, and lambda = 0 decided in one
place (no target; the forward is then exactly SimMIM's).
"""

from __future__ import annotations

import torch

from lut_fast.masking import make_noise
from lut_fast.models.simmim import LUTSimMIM, SimMIM, build_simmim
from lut_fast.tasks.base import Task
from lut_fast.tasks.lut import LUTTask


def block_noise(model: SimMIM, global_rows: int, seed: int, micro_step: int) -> torch.Tensor:
    """Uniform noise per mask block, CPU, (global_rows, blocks**2): a function of (seed, micro-step) only."""
    return make_noise(global_rows, model.num_blocks, seed, micro_step, 0, "cpu")


class SimMIMTask(Task):
    name = "simmim"
    views = 1  # one RandomResizedCrop view (aug.recipe "mae" at SimMIM's scale 0.67..1)

    def __init__(self, model: SimMIM):
        super().__init__(model)

    @classmethod
    def from_config(cls, cfg) -> "SimMIMTask":
        return cls(build_simmim(cfg))

    def noise(self, global_rows: int, seed: int, micro_step: int) -> torch.Tensor:
        return block_noise(self.model, global_rows, seed, micro_step)

    def losses(self, forward, view1, view2, noise) -> dict[str, torch.Tensor]:
        return forward(view1, None, noise, None)


class LUTSimMIMTask(LUTTask):
    name = "lut_simmim"
    views = 2
    baseline = "simmim"  # what lambda = 0 trains

    def __init__(self, model: LUTSimMIM, momentum_start: float = 0.996, momentum_end: float = 1.0):
        super().__init__(model, momentum_start, momentum_end)

    @classmethod
    def from_config(cls, cfg) -> "LUTSimMIMTask":
        return cls(build_simmim(cfg), cfg.lut.ema_momentum, cfg.lut.ema_momentum_end)

    def noise(self, global_rows: int, seed: int, micro_step: int) -> torch.Tensor:
        return block_noise(self.model, global_rows, seed, micro_step)
