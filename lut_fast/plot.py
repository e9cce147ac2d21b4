"""``lut-fast plot``: training curves of one or more runs as a PNG (matplotlib, Agg).

Four panels over optimizer steps, read from each run's ``metrics.jsonl``:
the loss terms, lr and EMA momentum, throughput and data-wait share, and the
online k-NN top-1. Several runs share each panel (one colour per run,
labelled by run folder and method), so MAE and LUT runs compare side by side.
Training writes the same figure for its own run as ``<run>/curves.png``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from lut_fast.errors import UserError

TERM_STYLES = {"loss": "-", "mae_loss": "--", "bc_loss": ":"}  # any other *loss term: dash-dot


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (a line cut by a crash mid-write is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl: pass a run folder written by lut-fast train")
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_method(run_dir: str | os.PathLike) -> str | None:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("method")
    except yaml.YAMLError:
        return None


def run_label(run_dir: str | os.PathLike) -> str:
    """``folder (method)``, e.g. ``demo_mae (mae)``."""
    name = Path(run_dir).resolve().name
    method = run_method(run_dir)
    return f"{name} ({method})" if method else name


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike, labels: list[str] | None = None) -> Path:
    """Draw the curves of ``run_dirs`` into one PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lut_fast.evaluation.common import save_figure

    if not run_dirs:
        raise UserError("give at least one run folder")
    runs = [read_metrics(d) for d in run_dirs]
    labels = labels or [run_label(d) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} labels for {len(run_dirs)} runs")
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax_loss, ax_sched, ax_speed, ax_knn = axes.flat
    ax_mom, ax_wait = ax_sched.twinx(), ax_speed.twinx()
    any_knn = False
    for i, (records, label) in enumerate(zip(runs, labels)):
        c = colors(i % 10)
        terms = sorted({k for r in records for k in r if k.endswith("loss")}, key=lambda k: (k != "loss", k))
        for term in terms:
            ax_loss.plot(*series(records, term), TERM_STYLES.get(term, "-."), color=c, label=f"{label}: {term}")
        ax_sched.plot(*series(records, "lr"), "-", color=c, label=f"{label}: lr")
        if run_method(run_dirs[i]) != "mae":  # MAE has no momentum encoder (older MAE runs logged the unused schedule)
            ax_mom.plot(*series(records, "momentum"), "--", color=c, label=f"{label}: momentum")
        ax_speed.plot(*series(records, "images_per_sec"), "-", color=c, label=f"{label}: images/s")
        ax_wait.plot(*series(records, "data_wait_frac"), ":", color=c, label=f"{label}: data wait")
        steps, knn = series(records, "knn_top1")
        if steps:
            any_knn = True
            ax_knn.plot(steps, knn, "o-", color=c, label=label)
    ax_loss.set(title="loss terms", xlabel="step", ylabel="loss")
    ax_sched.set(title="lr (solid) and EMA momentum (dashed)", xlabel="step", ylabel="lr")
    ax_mom.set_ylabel("momentum")
    ax_speed.set(title="throughput (solid) and data-wait share (dotted)", xlabel="step", ylabel="images / s")
    ax_wait.set_ylabel("share of time waiting for data")
    ax_wait.set_ylim(0, 1)
    ax_knn.set(title="online k-NN top-1 (val)", xlabel="step", ylabel="top-1 (%)")
    if not any_knn:
        ax_knn.text(0.5, 0.5, "no k-NN points\n(run.knn_every was 0)", ha="center", va="center", transform=ax_knn.transAxes)
    for ax in (ax_loss, ax_sched, ax_speed, ax_knn):
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        if ax is ax_sched or ax is ax_speed:
            twin = ax_mom if ax is ax_sched else ax_wait
            h2, n2 = twin.get_legend_handles_labels()
            handles, names = handles + h2, names + n2
        if handles:
            ax.legend(handles, names, fontsize=7, loc="best")
    fig.suptitle("  vs  ".join(labels), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def write_training_curves(run_dir: str | os.PathLike) -> Path | None:
    """``<run_dir>/curves.png`` at the end of training; a drawing failure is a warning, not a failed run."""
    try:
        return plot_runs([run_dir], Path(run_dir) / "curves.png")
    except Exception as e:  # noqa: BLE001 - the run itself is complete and checkpointed
        print(f"lut-fast: warning: could not draw {Path(run_dir) / 'curves.png'}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
