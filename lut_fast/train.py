"""The train loop shared by LUT and MAE.

One optimizer step = ``accum_steps`` micro-batches. Per micro-batch: masking
noise from (seed, micro-step) for the global batch (each rank keeps its own
rows, so N processes train exactly like one with N times the batch), target
outputs under no_grad (LUT), the student's losses, backward (gradient sync
skipped on all but the last micro-batch under DDP). Per optimizer step: lr
from the schedule, optimizer step (through the GradScaler for fp16), EMA
update with the cosine momentum.

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
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lut_fast.checkpoint import remove_stale_temp_files, resume_checkpoint, save_checkpoint
from lut_fast.config import TrainConfig, from_dict, lr_description, source_lines, to_dict, to_yaml
from lut_fast.distributed import (
    DistInfo, all_reduce_max, all_reduce_mean, all_same, barrier, broadcast_from_main, cleanup,
    convert_sync_batchnorm, init_distributed, launched_by_torchrun, replicas_in_sync, restart_count,
    stop_when_parent_dies,
)
from lut_fast.ema import TargetNetwork, momentum_at
from lut_fast.errors import UserError
from lut_fast.fileio import append_line, make_dir, read_jsonl, write_text_atomic
from lut_fast.masking import make_noise
from lut_fast.models import LUT, build_model
from lut_fast.monitor import KnnMonitor, MetricSinks, check_settings, knn_due
from lut_fast.optim import build_optimizer, lr_at, scaled_lr
from lut_fast.pipelines import build_loader
from lut_fast.progress import TrainProgress, peak_tflops, training_flops_per_image
from lut_fast.resume import (
    check_branch, continue_schedule, copy_metrics_until, init_weights_from, load_resume_file, settings_on_resume,
)


# ---------------------------------------------------------------- device and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None = fp32). auto: bf16 on GPUs that have it, else fp16 (V100); fp32 on CPU."""
    if name == "fp32":
        return None
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bf16; use --precision fp16 (with loss scaling) or auto")
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if device.type == "cpu":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- run bookkeeping


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


@dataclass
class TrainResult:
    out_dir: Path
    last_checkpoint: Optional[Path]
    steps: int
    final_metrics: dict = field(default_factory=dict)
    stopped_early: str = ""  # "", "sigterm", "max_hours"


class MetricsLog:
    """JSON lines, one per logged step; on resume, lines past the checkpoint (and torn lines) are dropped."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> int:
        """Keep the lines up to ``step``; returns how many unreadable (torn) lines were dropped."""
        if not (self.enabled and self.path.exists()):
            return 0
        records, torn = read_jsonl(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        write_text_atomic("".join(json.dumps(r) + "\n" for r in kept), self.path)
        return len(torn)

    def write(self, record: dict) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(record))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _replicated_tensors(model: torch.nn.Module, target, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Everything that must be identical on all ranks: student, target (EMA) and optimizer state."""
    out = list(model.parameters()) + list(model.buffers())
    if target is not None:
        out += list(target.parameters()) + list(target.buffers())
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _train(cfg: TrainConfig, resume: bool, device: torch.device, dist_info: DistInfo, on_step,
           resume_from=None, init_from=None, given_keys=None) -> TrainResult:
    main = dist_info.is_main
    check_settings(cfg)  # monitor.py: a missing extra, k-NN data without val/: one line, on every rank
    out_dir = cfg.out_dir
    ckpt_dir = out_dir / "checkpoints"
    amp_dtype = resolve_precision(cfg.run.precision, device)

    if not resume and restart_count() > 0:
        resume = True  # torchrun --max-restarts restarted the group after a failure: continue the run
    branch_metrics, resume_warnings = None, []
    if resume_from is not None and not (restart_count() > 0 and (ckpt_dir / "last.pt").exists()):
        checkpoint = load_resume_file(Path(resume_from))
        branch_metrics = check_branch(Path(resume_from), ckpt_dir, checkpoint["step"])
        resume = True
    else:  # a restarted group continues from its own newest checkpoint, also when it began with --resume-from
        checkpoint, resume_warnings = resume_checkpoint(ckpt_dir) if resume else (None, [])
    # Every rank reads the checkpoint itself; all must see the same one, and all must stop together
    # (one rank raising alone would leave the others waiting in a collective).
    found_step = checkpoint["step"] if checkpoint is not None else -1
    occupied = int(not resume and (ckpt_dir / "last.pt").exists())
    if not (all_same(found_step, device) and all_same(occupied, device)):
        raise UserError(
            f"the processes see different checkpoints in {ckpt_dir}: "
            "the output folder must be on a filesystem that every node shares"
        )
    changes: list[str] = []
    if checkpoint is not None:
        # The saved recipe wins; settings given now may change only where resume.py allows (else: refused).
        cfg, changes = settings_on_resume(from_dict(TrainConfig, checkpoint["config"]), cfg, given_keys)
        o = cfg.optim
        saved_world = checkpoint.get("world_size") or checkpoint["schedule"]["eff_batch"] // (o.batch_size * o.accum_steps)
        if saved_world != dist_info.world_size:
            raise UserError(
                f"the checkpoint in {ckpt_dir} was trained by {saved_world} process(es), this run has "
                f"{dist_info.world_size}: the effective batch, lr and data order would change; "
                f"resume with {saved_world} processes"
            )
    elif occupied:
        raise UserError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")

    seed_everything(cfg.run.seed)
    loader = build_loader(
        cfg.data.backend, cfg.data.path, cfg.aug, cfg.optim.batch_size, device=device,
        num_workers=cfg.data.num_workers, seed=cfg.run.seed, rank=dist_info.rank,
        world_size=dist_info.world_size, channels_last=cfg.data.channels_last and device.type == "cuda",
        photometric_on=cfg.data.photometric_on, **cfg.data.backend_options(),
    )
    sched = make_schedule(cfg, len(loader), dist_info.world_size)
    if main:  # before the model is built: a folder that cannot be written fails in seconds, not at the first checkpoint
        make_dir(out_dir, "output folder")
        make_dir(ckpt_dir, "checkpoint folder")
        for line in resume_warnings + [f"removed {len(stale)} temporary file(s) left by an interrupted checkpoint write "
                                       f"in {ckpt_dir}" for stale in [remove_stale_temp_files(ckpt_dir)] if stale]:
            print(f"lut-fast: warning: {line}", file=sys.stderr)
    if checkpoint is not None:
        changes += continue_schedule(sched, checkpoint["schedule"], checkpoint["step"],
                                     lambda s, i: lr_at(i, s.total_steps, s.warmup_steps, s.peak_lr, cfg.optim.min_lr))

    model = build_model(cfg)
    if init_from is not None:
        changes.append(init_weights_from(model, init_from) if checkpoint is None
                       else f"--init-from {init_from} not used: continuing from the checkpoint at step {checkpoint['step']}")
    model = model.to(device)
    if dist_info.enabled and isinstance(model, LUT):
        model = convert_sync_batchnorm(model, device.type)  # BatchNorm over the global batch (docs/METHOD.md, "7. BatchNorm in the heads")
    target = TargetNetwork(model).to(device) if isinstance(model, LUT) and model.lam > 0 else None
    optimizer = build_optimizer(model, sched.peak_lr, cfg.optim.weight_decay, cfg.optim.betas, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if target is not None:
            target.load_state_dict(checkpoint["target"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"])
        start_step = checkpoint["step"]

    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=main)
    if main:
        write_text_atomic(to_yaml(cfg), out_dir / "config.yaml")
        if branch_metrics is not None:
            copy_metrics_until(branch_metrics, metrics.path, start_step)
        if torn := metrics.truncate_after(start_step):
            print(f"lut-fast: warning: dropped {torn} unreadable line(s) of {metrics.path} (cut off by a crash or a full disk)",
                  file=sys.stderr)
        _print_header(cfg, sched, device, amp_dtype, dist_info, start_step, changes)
    # Watching the run (monitor.py): the k-NN check runs on rank 0 only, the others wait for it.
    knn_monitor = KnnMonitor.from_config(cfg, device) if main else None
    sinks = MetricSinks.from_config(cfg, out_dir, start_step, enabled=main)

    student = model
    if dist_info.enabled:
        # LUT with lambda = 0 never uses its heads: DDP must then look for unused parameters.
        unused = isinstance(model, LUT) and target is None
        student = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    forward = torch.compile(student) if cfg.run.compile else student
    if cfg.run.compile and target is not None:
        target.compile()  # in place: the target's full-image passes are a large share of LUT's FLOPs

    def state_at(step: int) -> dict:
        return {
            "step": step,
            "model": model.state_dict(),
            "target": target.state_dict() if target is not None else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "config": to_dict(cfg),
            "rng": _rng_state(),
            "schedule": vars(sched),
            "world_size": dist_info.world_size,
        }

    last_ckpt: Optional[Path] = (ckpt_dir / "last.pt").resolve() if checkpoint is not None else None

    def checkpoint_now(step: int) -> None:
        nonlocal last_ckpt
        if dist_info.enabled:
            # Replicas should be bit-identical (same reduced gradients, same EMA); if one drifted, rank 0's
            # state (the one saved) is copied to all, so the run continues from what the checkpoint holds.
            replicated = _replicated_tensors(model, target, optimizer)
            if not replicas_in_sync(replicated, device):
                if main:
                    print(f"lut-fast: warning: model replicas differed at step {step}; re-synchronised from rank 0",
                          file=sys.stderr)
                broadcast_from_main(replicated, device)
        if main:
            last_ckpt = save_checkpoint(state_at(step), ckpt_dir, step, cfg.run.keep_checkpoints)
        barrier()

    accum = cfg.optim.accum_steps
    bpe = len(loader)
    step = start_step
    consumed = step * accum  # micro-batches consumed so far
    epoch, start_batch = divmod(consumed, bpe)
    bad_images = 0
    t0 = time.perf_counter()
    window = {"t": time.perf_counter(), "images": 0, "data_wait": 0.0}
    running: dict[str, list[torch.Tensor]] = {}
    stopped = ""
    last_record: dict = {}
    num_patches = model.encoder.num_patches

    progress = TrainProgress(
        enabled=main, use_bar=cfg.run.progress, total=sched.total_steps, start=start_step,
        flops_per_image=training_flops_per_image(cfg), peak_per_device=peak_tflops(device, amp_dtype),
        world_size=dist_info.world_size,
    )
    with StopSignal(announce=main) as stop, progress, sinks:
        if launched_by_torchrun():  # its agent SIGKILLed: checkpoint and stop instead of training on as orphans
            stop_when_parent_dies(lambda: setattr(stop, "requested", True))
        micro = 0
        while step < sched.total_steps:
            loader.set_epoch(epoch, start_batch)
            batches = iter(loader)
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                window["data_wait"] += time.perf_counter() - t_wait
                if batch is None:
                    break
                bad_images += batch.bad_images
                if batch.bad_images:
                    progress.note_bad_images(batch)
                if bad_images > cfg.data.max_bad_images:
                    raise UserError(
                        f"{bad_images} unreadable images so far (limit data.max_bad_images={cfg.data.max_bad_images}): "
                        "check the data folder"
                    )
                # Noise for the whole global batch from (seed, micro-step); each rank keeps the rows of its
                # own samples (the sampler gives rank r positions r*B..(r+1)*B of each global batch), so N
                # processes mask exactly like one process with N times the batch.
                rows = batch.size
                noise = make_noise(rows * dist_info.world_size, num_patches, cfg.run.seed, consumed, 0, "cpu")
                noise = noise[dist_info.rank * rows : (dist_info.rank + 1) * rows].to(device, non_blocking=True)
                with autocast(device, amp_dtype):
                    targets = target.targets(batch.view1, batch.view2, model.symmetric) if target is not None else None
                micro += 1
                consumed += 1
                sync = micro == accum
                ctx = student.no_sync() if (dist_info.enabled and not sync) else contextlib.nullcontext()
                with ctx:
                    with autocast(device, amp_dtype):
                        out = forward(batch.view1, batch.view2, noise, targets)
                    scaler.scale(out["loss"] / accum).backward()
                for k, v in out.items():
                    running.setdefault(k, []).append(v.detach())
                window["images"] += batch.size * dist_info.world_size
                if not sync:
                    continue
                micro = 0

                lr = lr_at(step, sched.total_steps, sched.warmup_steps, sched.peak_lr, cfg.optim.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if cfg.optim.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                try:
                    scaler.step(optimizer)
                except RuntimeError as e:  # an lr beyond float32's range: the update itself is inf
                    if "without overflow" not in str(e):
                        raise
                    raise UserError(f"the update became inf at step {step + 1} (lr {lr:.3g}): stopping; "
                                    f"the last good checkpoint is kept in {ckpt_dir}") from None
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                m = momentum_at(step, sched.total_steps, cfg.lut.ema_momentum, cfg.lut.ema_momentum_end)
                if target is not None:
                    target.update(model, m)
                step += 1
                knn: dict = {}
                if knn_due(cfg.run.knn_every, step, sched.total_steps):
                    if knn_monitor is not None:
                        knn = knn_monitor.evaluate(model.encoder)
                        window["t"] += knn["knn_seconds"]  # the check is not training throughput
                    barrier()

                log_now = step % cfg.run.log_every == 0 or step == sched.total_steps
                ckpt_now = step % cfg.run.ckpt_every == 0 or step == sched.total_steps
                if log_now or ckpt_now:
                    record = {k: torch.stack(v).float().mean().item() for k, v in running.items()}
                    record = all_reduce_mean(record, device)  # the global batch's losses, the same on every rank
                    running.clear()
                    if not all(math.isfinite(v) for v in record.values()):
                        msg = (
                            f"loss became {record.get('loss')} at step {step}: stopping; "
                            f"the last good checkpoint is kept in {ckpt_dir}"
                        )
                        raise UserError(msg)
                    elapsed = time.perf_counter() - window["t"]
                    record.update(
                        step=step, epoch=round(consumed / bpe, 4), lr=lr, momentum=m,
                        images_per_sec=window["images"] / max(elapsed, 1e-9),
                        data_wait_frac=min(1.0, window["data_wait"] / max(elapsed, 1e-9)),
                        time=round(time.perf_counter() - t0, 3),
                    )
                    record.update(progress.throughput(record["images_per_sec"]))
                    window.update(t=time.perf_counter(), images=0, data_wait=0.0)
                    record.update(knn)
                    metrics.write(record)
                    sinks.log(record)
                    progress.update(step, record)
                    last_record = record
                elif knn:
                    knn_record = {"step": step, "epoch": round(consumed / bpe, 4), **knn}
                    metrics.write(knn_record)
                    sinks.log(knn_record)
                    progress.update(step, knn_record)
                if on_step is not None:
                    on_step(step, last_record)
                if ckpt_now:
                    checkpoint_now(step)
                over_time = cfg.run.max_hours is not None and (time.perf_counter() - t0) > cfg.run.max_hours * 3600
                stop_now = all_reduce_max(stop.requested or over_time, device) if dist_info.enabled else (stop.requested or over_time)
                if stop_now and step < sched.total_steps:
                    stopped = stop.reason if stop.requested else "max_hours"
                    if not ckpt_now:
                        checkpoint_now(step)
                    break
                if step >= sched.total_steps:
                    break
            if stopped or step >= sched.total_steps:
                break
            epoch, start_batch = epoch + 1, 0

    if main and cfg.run.curves:
        from lut_fast.plot import write_training_curves

        write_training_curves(out_dir)
    if main:
        _print_footer(out_dir, last_ckpt, step, last_record, progress.bad_images_report(bad_images, out_dir), stopped,
                      finished_before=checkpoint is not None and start_step >= sched.total_steps)
    return TrainResult(out_dir, last_ckpt, step, last_record, stopped)


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
