"""One optimizer step, the same for ``lut-fast train``, ``bench train`` and ``bench e2e``.

``train_step(state, micro_batches)``: for each of ``accum_steps`` micro-batches,
the masking noise of the global batch from (seed, micro-step) (this rank keeps
its rows), the task's losses under autocast, backward through the GradScaler
(DDP's gradient all-reduce skipped on all but the last micro-batch); then the
lr from the schedule, gradient clipping, the optimizer step, zero-grad and the
task's hook (LUT: the EMA update). Returns the step's metrics: the losses as
device tensors (means over the micro-batches; nothing is read back to the
host, so the step never waits for the GPU), and the lr (and momentum) as floats.

``TrainState`` is everything a step changes; ``state_dict()`` is what a
checkpoint holds (``model``, ``target``, ``optimizer``, ``scaler``, ``rng``,
``schedule``, ``config``, ``step``, ``world_size``) and ``load_state_dict``
reads it back, old checkpoints included.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lut_fast.config import TrainConfig, to_dict
from lut_fast.errors import UserError
from lut_fast.optim import build_optimizer, lr_at, scaled_lr
from lut_fast.runtime import autocast
from lut_fast.tasks import Task


class TrainingDiverged(UserError):
    """The loss or the update became inf/nan (the trainer adds where the last good checkpoint is)."""


# ---------------------------------------------------------------- the schedule


@dataclass
class Schedule:
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    peak_lr: float
    eff_batch: int


def make_schedule(cfg: TrainConfig, batches_per_epoch: int, world_size: int) -> Schedule:
    o = cfg.optim
    steps_per_epoch = batches_per_epoch // o.accum_steps
    if steps_per_epoch == 0:
        raise UserError(
            f"one epoch has {batches_per_epoch} batches per process, fewer than --accum {o.accum_steps}: "
            "use a smaller batch or accumulation"
        )
    total = o.max_steps or max(1, math.ceil(o.epochs * steps_per_epoch))
    # With --max-steps the schedule is compressed to fit; warm-up keeps its share.
    warmup = round(total * o.warmup_epochs / o.epochs)
    eff_batch = o.batch_size * o.accum_steps * world_size
    peak = o.lr if o.lr is not None else scaled_lr(o.blr, eff_batch, o.lr_scaling)
    return Schedule(steps_per_epoch, total, warmup, peak, eff_batch)


# ---------------------------------------------------------------- random state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- the state


@dataclass
class TrainState:
    cfg: TrainConfig
    task: Task  # the student (task.model) and, where the method has one, its target
    student: nn.Module  # task.model, or its DDP wrapper (whose no_sync the step uses)
    forward: nn.Module  # what the step calls: the student, compiled when cfg.run.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    rank: int = 0
    world_size: int = 1
    step: int = 0  # optimizer steps taken

    @property
    def model(self) -> nn.Module:
        return self.task.model

    def lr(self) -> float:
        s = self.schedule
        return lr_at(self.step, s.total_steps, s.warmup_steps, s.peak_lr, self.cfg.optim.min_lr)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "target": None,  # the key every checkpoint has; a task with a target fills it in
            **self.task.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": to_dict(self.cfg),
            "rng": rng_state(),
            "schedule": vars(self.schedule),
            "world_size": self.world_size,
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        """Weights, optimizer, scaler, random state and step (the schedule is re-planned by the caller)."""
        self.model.load_state_dict(checkpoint["model"])
        self.task.load_extra_state(checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        self.step = checkpoint["step"]

    def replicated_tensors(self) -> list[torch.Tensor]:
        """Everything that must be identical on all ranks: student, task state (LUT's target), optimizer state."""
        out = list(self.model.parameters()) + list(self.model.buffers()) + self.task.replicated_tensors()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                out += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]
        return out


def build_train_state(cfg: TrainConfig, task: Task, schedule: Schedule, device: torch.device,
                      amp_dtype: Optional[torch.dtype], rank: int = 0, world_size: int = 1,
                      distributed: bool = False) -> TrainState:
    """Place the task, wrap the student for DDP, build optimizer and scaler, compile when asked."""
    task.to(device)
    student = task.prepare_distributed(device, distributed)  # before the optimizer: may swap BatchNorm modules
    optimizer = build_optimizer(task.model, schedule.peak_lr, cfg.optim.weight_decay, cfg.optim.betas,
                                fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    forward = student
    if cfg.run.compile:
        forward = torch.compile(student)
        task.compile()
    return TrainState(cfg, task, student, forward, optimizer, scaler, schedule, device, amp_dtype, rank, world_size)


# ---------------------------------------------------------------- the step


def no_sync_unless(last: bool, student: nn.Module):
    """DDP skips the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    if last or not isinstance(student, DDP):
        return contextlib.nullcontext()
    return student.no_sync()


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, lr: float,
                 clip_grad: Optional[float], params: Iterable[torch.Tensor], step: int) -> None:
    """lr (times a group's ``lr_scale``, for layer-wise decay), clipping, the optimizer step, zero-grad.

    ``step``: the 1-based number of this update, for the error message.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    try:
        scaler.step(optimizer)
    except RuntimeError as e:  # an lr beyond float32's range: the update itself is inf
        if "without overflow" not in str(e):
            raise
        raise TrainingDiverged(f"the update became inf at step {step} (lr {lr:.3g}): stopping") from None
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(state: TrainState, micro_batches: Iterable) -> dict:
    """One optimizer step over ``cfg.optim.accum_steps`` micro-batches (``Batch``: view1, view2, size)."""
    accum = state.cfg.optim.accum_steps
    parts: dict[str, list[torch.Tensor]] = {}
    i = -1
    for i, batch in enumerate(micro_batches):
        # Noise for the whole global batch from (seed, micro-step); each rank keeps the rows of its own
        # samples (the sampler gives rank r positions r*B..(r+1)*B of each global batch).
        rows = batch.size
        noise = state.task.noise(rows * state.world_size, state.cfg.run.seed, state.step * accum + i)
        noise = noise[state.rank * rows : (state.rank + 1) * rows].to(state.device, non_blocking=True)
        with no_sync_unless(i == accum - 1, state.student):
            with autocast(state.device, state.amp_dtype):
                out = state.task.losses(state.forward, batch.view1, batch.view2, noise)
            state.scaler.scale(out["loss"] / accum).backward()
        for k, v in out.items():
            parts.setdefault(k, []).append(v.detach())
    if i != accum - 1:
        raise ValueError(f"train_step got {i + 1} micro-batches, expected {accum}")
    lr = state.lr()
    apply_update(state.optimizer, state.scaler, lr, state.cfg.optim.clip_grad, state.model.parameters(), state.step + 1)
    hooks = state.task.after_optimizer_step(state.step, state.schedule.total_steps)
    state.step += 1
    return {**{k: torch.stack(v).float().mean() for k, v in parts.items()}, "lr": lr, **hooks}
