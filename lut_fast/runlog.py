"""What the train loop records per step: the micro-batch stream, the throughput window, metric lines.

``RunLog`` keeps the bookkeeping out of the loop: it times ``next(loader)``
(the data wait), counts unreadable images against ``data.max_bad_images``,
averages the step metrics between log lines, runs the online k-NN check when
due, checks the logged losses are finite, and writes each record to
``metrics.jsonl``, the sinks (TensorBoard / W&B) and the terminal.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from lut_fast.config import TrainConfig, to_yaml
from lut_fast.distributed import DistInfo, all_reduce_mean, barrier
from lut_fast.errors import UserError
from lut_fast.fileio import append_line, read_jsonl, write_text_atomic
from lut_fast.monitor import KnnMonitor, MetricSinks, knn_due
from lut_fast.progress import TrainProgress, peak_tflops, training_flops_per_image
from lut_fast.step import TrainingDiverged


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


class RunLog:
    def __init__(self, cfg: TrainConfig, schedule, batches_per_epoch: int, device: torch.device, dist_info: DistInfo,
                 amp_dtype, start_step: int):
        self.cfg, self.schedule, self.bpe, self.device, self.dist = cfg, schedule, batches_per_epoch, device, dist_info
        main = dist_info.is_main
        self.metrics = MetricsLog(cfg.out_dir / "metrics.jsonl", enabled=main)
        # Watching the run (monitor.py): the k-NN check runs on rank 0 only, the others wait for it.
        self.knn_monitor = KnnMonitor.from_config(cfg, device) if main else None
        self.sinks = MetricSinks.from_config(cfg, cfg.out_dir, start_step, enabled=main)
        self.progress = TrainProgress(
            enabled=main, use_bar=cfg.run.progress, total=schedule.total_steps, start=start_step,
            flops_per_image=training_flops_per_image(cfg), peak_per_device=peak_tflops(device, amp_dtype),
            world_size=dist_info.world_size,
        )
        self.bad_images = 0
        self.t0 = time.perf_counter()
        self._window = {"t": self.t0, "images": 0, "data_wait": 0.0}
        self._running: dict[str, list[torch.Tensor]] = {}
        self.last_record: dict = {}

    def open_files(self, start_step: int, branch_metrics: Path | None) -> None:
        """Rank 0: config.yaml, and metrics.jsonl cut back to the resumed step (or copied from the branch point)."""
        if not self.dist.is_main:
            return
        write_text_atomic(to_yaml(self.cfg), self.cfg.out_dir / "config.yaml")
        if branch_metrics is not None:
            from lut_fast.resume import copy_metrics_until

            copy_metrics_until(branch_metrics, self.metrics.path, start_step)
        if torn := self.metrics.truncate_after(start_step):
            print(f"lut-fast: warning: dropped {torn} unreadable line(s) of {self.metrics.path} "
                  "(cut off by a crash or a full disk)", file=sys.stderr)

    def __enter__(self) -> "RunLog":
        self.progress.__enter__()
        self.sinks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.sinks.__exit__(*exc)
        self.progress.__exit__(*exc)

    # ---------------------------------------------------------------- the data
    def micro_batches(self, loader, start: int) -> Iterator:
        """Micro-batches from position ``start`` (micro-batches consumed so far) on, across epochs, timed."""
        epoch, first = divmod(start, self.bpe)
        while True:
            loader.set_epoch(epoch, first)
            batches = iter(loader)
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                self._window["data_wait"] += time.perf_counter() - t_wait
                if batch is None:
                    break
                self._count_bad_images(batch)
                self._window["images"] += batch.size * self.dist.world_size
                yield batch
            epoch, first = epoch + 1, 0

    def _count_bad_images(self, batch) -> None:
        self.bad_images += batch.bad_images
        if batch.bad_images:
            self.progress.note_bad_images(batch)
        limit = self.cfg.data.max_bad_images
        if self.bad_images > limit:
            raise UserError(f"{self.bad_images} unreadable images so far (limit data.max_bad_images={limit}): "
                            "check the data folder")

    # ---------------------------------------------------------------- per optimizer step
    def after_step(self, step: int, metrics: dict, encoder: torch.nn.Module, write: bool) -> None:
        """Keep the step's losses; run the k-NN check when due; with ``write`` (a log or checkpoint step),
        average the losses over every rank and step since the last line and write the record."""
        floats = {k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                self._running.setdefault(k, []).append(v)
        knn: dict = {}
        if knn_due(self.cfg.run.knn_every, step, self.schedule.total_steps):
            if self.knn_monitor is not None:
                knn = self.knn_monitor.evaluate(encoder)
                self._window["t"] += knn["knn_seconds"]  # the check is not training throughput
            barrier()
        epoch = round(step * self.cfg.optim.accum_steps / self.bpe, 4)
        if write:
            record = {k: torch.stack(v).float().mean().item() for k, v in self._running.items()}
            record = all_reduce_mean(record, self.device)  # the global batch's losses, the same on every rank
            self._running.clear()
            if not all(math.isfinite(v) for v in record.values()):
                raise TrainingDiverged(f"loss became {record.get('loss')} at step {step}: stopping")
            elapsed = max(time.perf_counter() - self._window["t"], 1e-9)
            record.update(step=step, epoch=epoch, **floats, images_per_sec=self._window["images"] / elapsed,
                          data_wait_frac=min(1.0, self._window["data_wait"] / elapsed),
                          time=round(time.perf_counter() - self.t0, 3))
            record.update(self.progress.throughput(record["images_per_sec"]))
            self._window.update(t=time.perf_counter(), images=0, data_wait=0.0)
            record.update(knn)
            self.last_record = record
        elif knn:
            record = {"step": step, "epoch": epoch, **knn}
        else:
            return
        self.metrics.write(record)
        self.sinks.log(record)
        self.progress.update(step, record)

    def over_time(self) -> bool:
        hours = self.cfg.run.max_hours
        return hours is not None and (time.perf_counter() - self.t0) > hours * 3600
