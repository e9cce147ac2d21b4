"""What a training run prints while it runs: a progress bar on a terminal, plain log lines elsewhere.

Cluster jobs write stdout to a file (SLURM ``.out``, nohup, ``docker logs``),
where a progress bar prints nothing useful. So:

* stdout is a terminal and ``run.progress`` is true: a rich progress bar that
  fits the terminal (80 columns included), with loss, images/s and an ETA;
* otherwise (stdout is a file or pipe, or ``run.progress=false``): one plain
  line every ``run.log_every`` optimizer steps, on stdout::

      step 40/400 (10%) | loss 0.8123 (mae 0.7010, bc 0.1113) | lr 1.20e-03 | 85.2 img/s 0.40 TFLOP/s | data wait 12% | eta 4m10s

The ETA divides the remaining steps by a moving average of the step rate
(exponential, over the logged windows), so one slow window (the first,
compilation, a checkpoint) does not make it jump. TFLOP/s uses the analytic
FLOP count of ``lut_fast/flops.py`` (the one ``lut-fast bench train`` uses);
MFU divides it by the cards' peak for the autocast dtype, shown only where the
GPU's peak is known (never on CPU).

Unreadable images: the count is always reported at the end; when the loader
names the files (``Batch.bad_paths``), the first few are printed and all are
written to ``bad_images.txt`` in the run folder.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import IO, Optional

import torch

# GPUs without bf16 whose fp16 tensor-core peak (dense TFLOP/s, data sheets) is the MFU reference.
FP16_ONLY_PEAK_TFLOPS = (("V100", 125.0), ("T4", 65.0))
BAD_IMAGES_FILE = "bad_images.txt"
BAD_IMAGES_SHOWN = 5


def format_duration(seconds: float) -> str:
    """3m07s, 2h05m, 3d04h: short and stable in width."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def peak_tflops(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Optional[float]:
    """Dense tensor-core peak of one device for the run's autocast dtype, or None where unknown.

    None on CPU and in fp32 (an MFU against a half-precision peak would
    mislead); the bf16 table is the one ``lut-fast bench`` uses.
    """
    if device.type != "cuda" or amp_dtype is None or not torch.cuda.is_available():
        return None
    from lut_fast.bench.machine import bf16_peak_tflops

    name = torch.cuda.get_device_name(device)
    peak = bf16_peak_tflops(name)
    if peak is None and amp_dtype == torch.float16:
        peak = next((p for key, p in FP16_ONLY_PEAK_TFLOPS if key.lower() in name.lower()), None)
    return peak


class EtaEstimate:
    """Seconds left from an exponential moving average of the step rate."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.sec_per_step: Optional[float] = None

    def update(self, steps: int, seconds: float) -> None:
        if steps <= 0 or seconds <= 0:
            return
        rate = seconds / steps
        if self.sec_per_step is None:
            self.sec_per_step = rate
        else:
            self.sec_per_step += self.smoothing * (rate - self.sec_per_step)

    def remaining(self, steps_left: int) -> float:
        return float("nan") if self.sec_per_step is None else steps_left * self.sec_per_step


class TrainProgress:
    """Progress bar or plain log lines for the main process; nothing on the other ranks.

    The loop calls ``update(step, record)`` at each logged step (``record`` as
    written to metrics.jsonl; ``throughput`` adds TFLOP/s and MFU to it first)
    and ``note_bad_images(batch)`` for each batch.
    """

    def __init__(self, enabled: bool, use_bar: bool, total: int, start: int, flops_per_image: float,
                 peak_per_device: Optional[float], world_size: int, stream: Optional[IO[str]] = None,
                 console=None):
        self.enabled, self.total, self.start = enabled, total, start
        stream = stream if stream is not None else sys.stdout
        self.stream = stream
        self.use_bar = enabled and use_bar and (console is not None or stream.isatty())
        self.flops_per_image = flops_per_image
        self.peak = peak_per_device * world_size if peak_per_device else None
        self.eta = EtaEstimate()
        self._last = (start, time.perf_counter())
        self._console = console
        self._bar = None
        self._knn: Optional[float] = None  # the latest online k-NN top-1 (monitor.py), shown beside the loss
        self._last_info = ""
        self.bad_paths: list[str] = []

    # ------------------------------------------------------------ figures

    def throughput(self, images_per_sec: float) -> dict:
        """TFLOP/s (and MFU where the peak is known) of the whole job at this image rate."""
        tflops = images_per_sec * self.flops_per_image / 1e12
        out = {"tflops": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        return out

    def line(self, step: int, record: dict, eta_s: float) -> str:
        """The plain log line (also what the bar's text is cut from)."""
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        loss = f"loss {record['loss']:.4f}"
        if "bc_loss" in record:
            reconstruction = "simmim" if "simmim_loss" in record else "mae"
            loss += f" ({reconstruction} {record[reconstruction + '_loss']:.4f}, bc {record['bc_loss']:.4f})"
        parts.append(loss)
        parts.append(f"lr {record['lr']:.2e}")
        speed = f"{record['images_per_sec']:.1f} img/s {record.get('tflops', 0.0):.2f} TFLOP/s"
        if "mfu" in record:
            speed += f" MFU {100 * record['mfu']:.0f}%"
        parts.append(speed)
        parts.append(f"data wait {100 * record['data_wait_frac']:.0f}%")
        parts.append(f"eta {format_duration(eta_s)}")
        return " | ".join(parts)

    # ------------------------------------------------------------ the loop's hooks

    def __enter__(self):
        if self.use_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            # Fixed-width columns: label 5 + bar 20 + steps 2 x 7 + separators; the text column gets the rest.
            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(bar_width=20), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), console=self._console, expand=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, record: dict) -> None:
        if "loss" not in record:  # the k-NN monitor's own record: shown with the next training line
            self._knn = record.get("knn_top1", self._knn)
            if self._bar is not None and self._last_info:
                self._bar.update(self._task, info=self._last_info + self._knn_text())
            return
        self._knn = record.get("knn_top1", self._knn)
        now = time.perf_counter()
        last_step, last_t = self._last
        self.eta.update(step - last_step, now - last_t)
        self._last = (step, now)
        if not self.enabled:
            return
        eta_s = self.eta.remaining(self.total - step)
        if self._bar is not None:
            self._last_info = self._bar_info(record, eta_s)
            self._bar.update(self._task, completed=step, info=self._last_info + self._knn_text())
        else:
            print(self.line(step, record, eta_s) + self._knn_text(" | "), file=self.stream, flush=True)

    def _knn_text(self, sep: str = "  ") -> str:
        return f"{sep}k-NN {self._knn:.1f}%" if self._knn is not None else ""

    def _bar_info(self, record: dict, eta_s: float) -> str:
        """loss, img/s, TFLOP/s (MFU), eta: as many as fit the console's width, in that priority."""
        width = self._bar.console.width
        fixed = len("train") + 1 + 20 + 1 + 2 * len(str(self.total)) + 1 + 1
        fixed += len(self._knn_text())  # the k-NN figure, when the monitor runs, is always shown
        speed = f"{record['images_per_sec']:.0f} img/s"
        flops = f"{record.get('tflops', 0.0):.2f} TFLOP/s" + (f" MFU {100 * record['mfu']:.0f}%" if "mfu" in record else "")
        wanted = [f"loss {record['loss']:.4f}", speed, f"eta {format_duration(eta_s)}", flops]
        shown: list[str] = []
        for part in wanted:
            if fixed + len("  ".join(shown + [part])) <= width:
                shown.append(part)
        return "  ".join(shown)

    def note_bad_images(self, batch) -> None:
        """Collect the names of unreadable images, where the loader gives them (``Batch.bad_paths``)."""
        self.bad_paths.extend(str(p) for p in getattr(batch, "bad_paths", ()) or ())

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def bad_images_report(self, count: int, out_dir: Path) -> Optional[str]:
        """The end-of-run line about unreadable images; writes all names to OUT/bad_images.txt."""
        if not count:
            return None
        msg = f"{count} unreadable image(s) were skipped"
        if self.bad_paths:
            names = sorted(set(self.bad_paths))
            (out_dir / BAD_IMAGES_FILE).write_text("".join(n + "\n" for n in names))
            shown = ", ".join(names[:BAD_IMAGES_SHOWN]) + (" ..." if len(names) > BAD_IMAGES_SHOWN else "")
            msg += f": {shown} (all in {out_dir / BAD_IMAGES_FILE})"
        return msg
