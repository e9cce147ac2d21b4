"""What one pre-training method adds to the shared train step (``lut_fast/step.py``).

The step and the loop never ask which method they run: everything that differs
between MAE, LUT and a future method lives behind this small interface.

* ``model``: the student, the module the optimizer trains and checkpoints save
  as ``checkpoint["model"]``; its ``.encoder`` is a ``ViTEncoder``.
* ``noise(global_rows, seed, micro_step)``: the masking noise of the *global*
  batch, on the CPU, a function of (seed, micro-step) only. The step keeps this
  rank's rows, so N processes mask exactly like one process with N times the
  batch, and a resumed run masks as the uninterrupted one did.
* ``losses(forward, view1, view2, noise)``: ``{"loss": to backward, ...detached
  parts}``. ``forward`` is the student as the step calls it (DDP-wrapped and/or
  compiled); a method with a target network runs it itself, under no_grad.
* ``after_optimizer_step(step, total_steps)``: work after each optimizer step
  (LUT: the EMA update); returns floats to log (LUT: ``{"momentum": m}``).
* ``prepare_distributed(device, enabled)``: wraps only the student in DDP (a
  target network stays outside: DDP, the optimizer and ``.train()`` never see it).
* ``extra_state()`` / ``load_extra_state(checkpoint)``: what a checkpoint holds
  besides model, optimizer and scaler; ``replicated_tensors()``: what besides the
  student must be identical on every rank.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lut_fast.masking import make_noise


class Task:
    name: ClassVar[str] = ""
    views: ClassVar[int] = 1  # 1: the loader's MAE recipe (view2 is None); 2: two views per image
    # BatchNorm whose statistics must cover the global batch under DDP (LUT's heads).
    sync_batchnorm: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def from_config(cls, cfg) -> "Task":
        raise NotImplementedError

    # ------------------------------------------------------------------ per micro-batch
    def noise(self, global_rows: int, seed: int, micro_step: int) -> torch.Tensor:
        """Uniform noise per patch (argsort = the shuffle, ``lut_fast/masking.py``), CPU, (global_rows, L)."""
        return make_noise(global_rows, self.model.encoder.num_patches, seed, micro_step, 0, "cpu")

    def losses(self, forward, view1: torch.Tensor, view2: torch.Tensor | None, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ per optimizer step
    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """``step``: optimizer steps taken before this one (0 for the first)."""
        return {}

    # ------------------------------------------------------------------ placement
    @property
    def find_unused_parameters(self) -> bool:
        """True where some student parameters get no gradient (DDP must then look for them each step)."""
        return False

    def to(self, device: torch.device) -> "Task":
        self.model.to(device)
        return self

    def prepare_distributed(self, device: torch.device, enabled: bool) -> nn.Module:
        """The student as the step calls it: wrapped in DDP when ``enabled`` (BatchNorm synchronised first
        where the method asks for it), else the model itself. Call before building the optimizer: the
        CPU BatchNorm conversion makes new parameters."""
        if not enabled:
            return self.model
        if self.sync_batchnorm:
            from lut_fast.distributed import convert_sync_batchnorm

            self.model = convert_sync_batchnorm(self.model, device.type)
        return DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=self.find_unused_parameters)

    def compile(self) -> None:
        """Compile whatever the task runs besides the student (the student is compiled by the caller)."""

    def init_weights(self, path: str) -> str:
        """A new run starts from the weights of ``path`` (``--init-from``); a line saying what was loaded."""
        from lut_fast.resume import init_weights_from

        return init_weights_from(self.model, path)

    # ------------------------------------------------------------------ checkpoints and replicas
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, checkpoint: dict) -> None:
        pass

    def replicated_tensors(self) -> list[torch.Tensor]:
        return []

