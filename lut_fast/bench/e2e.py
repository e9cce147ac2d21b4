"""``bench e2e``: the real train loop (``lut_fast.train.train``) fed by a chosen backend for N steps.

The loop logs every step here (``run.log_every = 1``); each metrics line has
``images_per_sec`` and ``data_wait_frac`` (the share of the step's wall time
spent in ``next(loader)``). After ``warmup`` steps the rest are pooled,
time-weighted: images/s = images / seconds, data wait = waiting seconds /
seconds. Logging every step reads the loss each step (one device sync), so
the waiting time is not hidden by CUDA's asynchronous queue.

On a CPU the row says (``loader_cost_hidden``, ``loader_cost_note``) that
the workers share the cores with the model, so the loader's cost is inside
the step time rather than in the data wait.

Verdict: data wait >= 25 % input-bound, <= 5 % compute-bound, between: mostly
compute-bound with input stalls.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lut_fast.bench.measure import median, round_sig
from lut_fast.bench.report import row
from lut_fast.errors import UserError

INPUT_BOUND, COMPUTE_BOUND = 0.25, 0.05

SHARED_CORES_NOTE = (
    "on a CPU the loader's workers and the model step share the same cores, so the loader's cost hides in the "
    "step time: a low data wait does not mean loading is free (each image's CPU ms, from `bench data`, is taken "
    "from the model); only a GPU run separates the two"
)


def verdict(wait: float, backend: str, device: str) -> str:
    pct = f"{wait:.0%}"
    if wait >= INPUT_BOUND:
        hint = "more workers, a faster backend (dali / ffcv), or smaller stored images"
        return f"input-bound: the {device} waits for data {pct} of each step; try {hint}"
    if wait <= COMPUTE_BOUND:
        return f"compute-bound: the {backend} backend keeps up (data wait {pct}); speed up the model step instead"
    return f"mostly compute-bound, with input stalls ({pct} of each step waits for data from {backend})"


def summarise(records: list[dict], batch_images: int, warmup: int) -> dict:
    """Pool the per-step metric lines after ``warmup`` steps (time-weighted)."""
    measured = [r for r in records if r.get("step", 0) > warmup and r.get("images_per_sec")]
    if not measured:
        raise UserError(f"no step after the {warmup} warm-up steps was logged: raise --steps")
    seconds = [batch_images / r["images_per_sec"] for r in measured]
    waits = [r["data_wait_frac"] * s for r, s in zip(measured, seconds, strict=True)]
    total, waited = sum(seconds), sum(waits)
    return {
        "steps_measured": len(measured),
        "images_per_sec": batch_images * len(measured) / total,
        "step_ms": 1000 * total / len(measured),
        "step_ms_median": 1000 * median(seconds),
        "data_wait_frac": waited / total,
        "compute_images_per_sec": batch_images * len(measured) / max(total - waited, 1e-9),
        "loss_last": measured[-1].get("loss"),
    }


def run_e2e(method: str, model: str, backend: str, data: str | None, batch_size: int, workers: int, steps: int,
            warmup: int, img_size: int, device: str, precision: str, compile: bool, sets: list[str],
            direction: str = "symmetric", keep_out: str | None = None) -> tuple[dict, dict]:
    """(result row, the resolved config as a dict)."""
    from lut_fast.config import load_config, to_dict
    from lut_fast.train import train

    if steps <= warmup:
        raise UserError(f"--steps ({steps}) must exceed --warmup ({warmup})")
    if data is not None and (data == "builtin" or data.startswith(("synthetic", "photos"))):
        from lut_fast.bench.data import resolve_data

        data = resolve_data(data)[0]
    out_dir = Path(keep_out) if keep_out else Path(tempfile.mkdtemp(prefix="lut-fast-bench-e2e-"))
    flags = {
        "method": method, "model.name": model, "model.img_size": img_size, "data.path": data, "data.backend": backend,
        "data.num_workers": workers, "optim.batch_size": batch_size, "optim.max_steps": steps,
        "run.out_dir": str(out_dir), "run.device": device, "run.precision": precision, "run.compile": compile,
        "run.log_every": 1, "run.ckpt_every": 10**9, "run.keep_checkpoints": 1, "run.progress": False,
        "lut.direction": direction,
    }
    cfg = load_config(None, flags, sets)
    label = f"{backend} {method}{'' if method == 'mae' else ' ' + direction} {model}"
    key = f"e2e/{backend}/{method if method == 'mae' else 'lut_' + ('sym' if direction == 'symmetric' else 'one_way')}"
    try:
        result = train(cfg)
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(ln) for ln in lines if ln.strip()]
    finally:
        if not keep_out:
            shutil.rmtree(out_dir, ignore_errors=True)
    from lut_fast.runtime import resolve_device

    dev = resolve_device(device).type
    s = summarise(records, batch_size * cfg.optim.accum_steps, warmup)
    out = row(
        "e2e", key, label=label, backend=backend, method=method, direction=direction, model=model,
        steps=result.steps, warmup_steps=warmup, batch_size=batch_size, workers=workers, device=dev,
        **{k: round_sig(v) if isinstance(v, float) else v for k, v in s.items()},
    )
    out["verdict"] = verdict(s["data_wait_frac"], backend, "GPU" if dev == "cuda" else dev.upper())
    if dev != "cuda":
        out["loader_cost_hidden"] = True
        out["loader_cost_note"] = SHARED_CORES_NOTE
    return out, to_dict(cfg)
