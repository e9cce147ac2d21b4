"""The train loop: resume or start, build, then one ``step.train_step`` per optimizer step.

What a step does (noise, forward, backward, lr, clipping, scaler, the task's
hook) is ``lut_fast/step.py``; what differs between MAE and LUT is the task
(``lut_fast/tasks/``); which checkpoint a run continues is ``resume.resolve_start``;
the per-step bookkeeping (data wait, metric lines, the k-NN check) is
``lut_fast/runlog.py``. The loop below only ties them together.

Faults (README: "Faults"): SIGTERM / SIGUSR1 (pre-emption), a first Ctrl-C
(SIGINT) and the ``--max-hours`` budget make every rank stop at the same step
(agreed through an all-reduce), rank 0 writes a checkpoint, and the process
exits with code 0; a second Ctrl-C exits at once.
A worker group restarted by ``torchrun --max-restarts`` resumes from the last
checkpoint by itself (TORCHELASTIC_RESTART_COUNT > 0), as ``--resume`` does.

Output folder: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``
(``last.pt`` -> newest complete checkpoint). Resuming restores model, target,
optimizer, scaler and the position in the data stream; data order,
augmentations and masks are functions of (seed, position), so a resumed run
reproduces the losses of an uninterrupted one. Which settings a resumed run
may change, extending a run, ``--resume-from`` and ``--init-from``:
``lut_fast/resume.py``. What is printed while training: ``lut_fast/progress.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from lut_fast.checkpoint import checkpoint_all_ranks, remove_stale_temp_files
from lut_fast.config import TrainConfig, lr_description, source_lines
from lut_fast.distributed import (
    DistInfo, all_reduce_max, cleanup, init_distributed, launched_by_torchrun, stop_when_parent_dies,
)
from lut_fast.errors import UserError
from lut_fast.fileio import make_dir
from lut_fast.monitor import check_settings
from lut_fast.optim import lr_at
from lut_fast.pipelines import build_loader
from lut_fast.resume import continue_schedule, resolve_start
from lut_fast.runlog import RunLog
from lut_fast.runtime import resolve_device, resolve_precision
from lut_fast.step import (  # noqa: F401 - Schedule, make_schedule: imported from here by callers and tests
    Schedule, TrainingDiverged, build_train_state, make_schedule, seed_everything, train_step,
)
from lut_fast.tasks import build_task


# ---------------------------------------------------------------- run bookkeeping


@dataclass
class TrainResult:
    out_dir: Path
    last_checkpoint: Optional[Path]
    steps: int
    final_metrics: dict = field(default_factory=dict)
    stopped_early: str = ""  # "", "sigterm", "max_hours"


class StopSignal:
    """SIGTERM / SIGUSR1 (cluster pre-emption) and a first Ctrl-C ask for a checkpoint and a clean exit.

    A second Ctrl-C exits at once (KeyboardInterrupt: exit code 130, no checkpoint).
    """

    def __init__(self, announce: bool = True):
        self.requested = False
        self.interrupts = 0
        self.announce = announce  # only the main process prints
        self._old = {}
        self._pid = os.getpid()

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherited this handler: the trainer decides, workers keep serving
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            if self.announce:
                print("\nlut-fast: Ctrl-C: saving a checkpoint after this step, then stopping "
                      "(press Ctrl-C again to quit at once, without one)", file=sys.stderr, flush=True)
        self.requested = True

    @property
    def reason(self) -> str:
        return "ctrl-c" if self.interrupts else "sigterm"

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: bool = False, on_step: Callable[[int, dict], None] | None = None, *,
          resume_from: str | os.PathLike | None = None, init_from: str | None = None,
          given_keys: Optional[set[str]] = None) -> TrainResult:
    """Run (or resume) pre-training. ``on_step(step, metrics)`` is called after each optimizer step.

    ``resume_from``: continue from this checkpoint file (implies ``resume``).
    ``init_from``: a new run starts from these weights (ignored when a checkpoint is resumed).
    ``given_keys``: the config keys set on the command line (what a resume compares; None = all).
    """
    device = resolve_device(cfg.run.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    try:
        return _train(cfg, resume, device, dist_info, on_step, resume_from, init_from, given_keys)
    finally:
        cleanup()


def build_train_loader(cfg: TrainConfig, device: torch.device, dist_info: DistInfo):
    """This rank's share of the pre-training data, as ``cfg.data`` and ``cfg.aug`` describe it."""
    return build_loader(
        cfg.data.backend, cfg.data.path, cfg.aug, cfg.optim.batch_size, device=device,
        num_workers=cfg.data.num_workers, seed=cfg.run.seed, rank=dist_info.rank,
        world_size=dist_info.world_size, channels_last=cfg.data.channels_last and device.type == "cuda",
        photometric_on=cfg.data.photometric_on, **cfg.data.backend_options(),
    )


def _train(cfg: TrainConfig, resume: bool, device: torch.device, dist_info: DistInfo, on_step,
           resume_from=None, init_from=None, given_keys=None) -> TrainResult:
    check_settings(cfg)  # monitor.py: a missing extra, k-NN data without val/: one line, on every rank
    ckpt_dir, main = cfg.out_dir / "checkpoints", dist_info.is_main
    start = resolve_start(cfg, resume, resume_from, ckpt_dir, device, dist_info.world_size, given_keys)
    cfg, checkpoint, changes = start.cfg, start.checkpoint, start.changes
    amp_dtype = resolve_precision(cfg.run.precision, device)
    seed_everything(cfg.run.seed)
    loader = build_train_loader(cfg, device, dist_info)
    sched = make_schedule(cfg, len(loader), dist_info.world_size)
    if main:  # before the model is built: a folder that cannot be written fails in seconds, not at the first checkpoint
        _prepare_out_dir(cfg.out_dir, ckpt_dir, start.warnings)
    if checkpoint is not None:
        changes += continue_schedule(sched, checkpoint["schedule"], checkpoint["step"],
                                     lambda s, i: lr_at(i, s.total_steps, s.warmup_steps, s.peak_lr, cfg.optim.min_lr))

    task = build_task(cfg)
    if init_from is not None:
        changes.append(task.init_weights(init_from) if checkpoint is None
                       else f"--init-from {init_from} not used: continuing from the checkpoint at step {checkpoint['step']}")
    state = build_train_state(cfg, task, sched, device, amp_dtype, dist_info.rank, dist_info.world_size, dist_info.enabled)
    if checkpoint is not None:
        state.load_state_dict(checkpoint)
    start_step, accum = state.step, cfg.optim.accum_steps
    log = RunLog(cfg, sched, len(loader), device, dist_info, amp_dtype, start_step)
    log.open_files(start_step, start.branch_metrics)
    if main:
        _print_header(cfg, sched, device, amp_dtype, dist_info, start_step, changes)

    def save() -> Path | None:
        return checkpoint_all_ranks(state, ckpt_dir, cfg.run.keep_checkpoints, dist_info.enabled, main)

    last_ckpt = (ckpt_dir / "last.pt").resolve() if checkpoint is not None else None
    stopped = ""
    micro_batches = log.micro_batches(loader, start_step * accum)
    with StopSignal(announce=main) as stop, log, last_good_checkpoint_in(ckpt_dir):
        if launched_by_torchrun():  # its agent SIGKILLed: checkpoint and stop instead of training on as orphans
            stop_when_parent_dies(lambda: setattr(stop, "requested", True))
        while state.step < sched.total_steps:
            metrics = train_step(state, itertools.islice(micro_batches, accum))
            step = state.step
            log_now = step % cfg.run.log_every == 0 or step == sched.total_steps
            ckpt_now = step % cfg.run.ckpt_every == 0 or step == sched.total_steps
            log.after_step(step, metrics, task.model.encoder, write=log_now or ckpt_now)
            if on_step is not None:
                on_step(step, log.last_record)
            if ckpt_now:
                last_ckpt = save() or last_ckpt
            stop_now = agreed_stop(stop, log.over_time(), device, dist_info.enabled)  # a collective: every step
            if stop_now and step < sched.total_steps:
                stopped = stop_now
                if not ckpt_now:
                    last_ckpt = save() or last_ckpt
                break

    if main and cfg.run.curves:
        from lut_fast.plot import write_training_curves

        write_training_curves(cfg.out_dir)
    if main:
        _print_footer(cfg.out_dir, last_ckpt, state.step, log.last_record,
                      log.progress.bad_images_report(log.bad_images, cfg.out_dir), stopped,
                      finished_before=checkpoint is not None and start_step >= sched.total_steps)
    return TrainResult(cfg.out_dir, last_ckpt, state.step, log.last_record, stopped)


def agreed_stop(stop: "StopSignal", over_time: bool, device: torch.device, distributed: bool) -> str:
    """Why every rank stops now ("ctrl-c", "sigterm", "max_hours"), or "" to go on: one rank's signal stops all."""
    local = stop.requested or over_time
    if not (all_reduce_max(local, device) if distributed else local):
        return ""
    return stop.reason if stop.requested else "max_hours"


@contextlib.contextmanager
def last_good_checkpoint_in(ckpt_dir: Path):
    """A run that diverged says where its last good checkpoint is."""
    try:
        yield
    except TrainingDiverged as e:
        raise UserError(f"{e}; the last good checkpoint is kept in {ckpt_dir}") from None


def _prepare_out_dir(out_dir: Path, ckpt_dir: Path, warnings: list[str]) -> None:
    make_dir(out_dir, "output folder")
    make_dir(ckpt_dir, "checkpoint folder")
    if stale := remove_stale_temp_files(ckpt_dir):
        warnings = warnings + [f"removed {len(stale)} temporary file(s) left by an interrupted checkpoint write in {ckpt_dir}"]
    for line in warnings:
        print(f"lut-fast: warning: {line}", file=sys.stderr)


# ---------------------------------------------------------------- terminal output


def _print_header(cfg, sched: Schedule, device, amp_dtype, dist_info: DistInfo, start_step: int, changes=()) -> None:
    from rich.console import Console

    c = Console(stderr=True)
    prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16+loss scaling"}[amp_dtype]
    what = f"{cfg.method.upper()} {cfg.model.name} {cfg.model.img_size}px/p{cfg.model.patch_size}"
    c.print(f"[bold]{what}[/] on {device} ({prec}), {dist_info.world_size} process(es), backend {cfg.data.backend}")
    if getattr(cfg, "recipe_note", ""):
        c.print(f"[yellow]{cfg.recipe_note}[/]", highlight=False, soft_wrap=True)
    c.print(
        f"effective batch {sched.eff_batch} -> {lr_description(cfg, sched.eff_batch, sched.peak_lr)}, "
        f"{sched.total_steps} steps ({sched.steps_per_epoch}/epoch), warm-up {sched.warmup_steps}"
        + (f", resuming at step {start_step}" if start_step else ""),
        markup=False, highlight=False, soft_wrap=True,
    )
    # Where the recipe came from: the method's defaults, then what YAML / flags / --set chose.
    sources = source_lines(cfg)
    if sources:
        c.print("recipe (values other than the plain defaults, by where they came from):", highlight=False)
        for line in sources:
            c.print(line, markup=False, highlight=False, soft_wrap=True)
    for line in changes:  # settings changed on resume, a re-planned schedule, weights loaded by --init-from
        c.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


def _print_footer(out_dir: Path, ckpt: Optional[Path], step: int, record: dict, bad: Optional[str], stopped: str,
                  finished_before: bool = False) -> None:
    from rich.console import Console

    c = Console(stderr=True)
    if finished_before:
        c.print(f"[yellow]this run had already finished at step {step}: nothing to train; to train longer, resume "
                "with a larger --max-steps or --epochs (the schedule is re-planned: README, Resuming)[/]")
    if stopped:
        c.print(f"[yellow]stopped early ({stopped}) at step {step}; checkpoint saved: resume with --resume[/]")
    if bad:
        c.print(bad, style="yellow", markup=False, highlight=False, soft_wrap=True)
    if record:
        knn = f", online k-NN top-1 {record['knn_top1']:.2f}%" if "knn_top1" in record else ""
        c.print(f"final loss {record['loss']:.4f} at step {step}{knn}")
    c.print(f"results in [bold]{out_dir}[/]: config.yaml, metrics.jsonl, checkpoints/{ckpt.name if ckpt else ''}")
    sys.stderr.flush()
