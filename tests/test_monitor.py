"""Watching a run: the online k-NN monitor, TensorBoard / W&B sinks, curves (plot), resume without gaps."""

from __future__ import annotations

import json
import random
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from lut_fast.errors import UserError
from lut_fast.evaluation.knn import run_knn
from lut_fast.models.vit import build_encoder
from lut_fast.monitor import KnnMonitor, MetricSinks, knn_due, open_tensorboard, open_wandb
from lut_fast.plot import plot_runs, read_metrics
from lut_fast.train import train

from helpers import run_cli, tiny_config


def records(run_dir) -> list[dict]:
    return read_metrics(run_dir)


def loss_records(run_dir) -> dict[int, dict]:
    keys = ("loss", "mae_loss", "bc_loss", "lr", "momentum")
    return {r["step"]: {k: r[k] for k in keys} for r in records(run_dir) if "loss" in r}


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard tag, read back with TensorBoard's own reader (orphaned points purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same tiny LUT run without and with the k-NN monitor (whole built-in bank and val split)."""
    root = tmp_path_factory.mktemp("monitor")
    plain = tiny_config(root / "plain", "run.log_every=3", max_steps=6)
    watched = tiny_config(root / "watched", "run.log_every=3", "run.knn_every=2", "run.knn_bank=0", "run.knn_val=0",
                          max_steps=6)
    train(plain)
    result = train(watched)
    return root / "plain", root / "watched", result


@pytest.mark.slow
def test_knn_monitor_leaves_the_training_stream_unchanged(two_runs):
    plain, watched, _ = two_runs
    a, b = loss_records(plain), loss_records(watched)
    assert sorted(a) == [3, 6] and a == b  # bit-identical losses, lr and momentum


@pytest.mark.slow
def test_knn_is_logged_at_its_steps_and_matches_eval_knn(two_runs):
    _, watched, result = two_runs
    knn = {r["step"]: r["knn_top1"] for r in records(watched) if "knn_top1" in r}
    assert sorted(knn) == [2, 4, 6]  # every 2 steps, the last one merged into the step-6 metric line
    assert "loss" in next(r for r in records(watched) if r["step"] == 6)
    assert not any("knn_top1" in r for r in records(two_runs[0]))
    # with the whole bank and val split, the last online value is exactly `lut-fast eval knn` of the checkpoint
    offline = run_knn(result.last_checkpoint, workers=0, device="cpu", show_progress=False, cache=False)
    assert knn[6] == pytest.approx(offline["top1"], abs=1e-6)
    assert result.final_metrics["knn_top1"] == knn[6]


@pytest.mark.slow
def test_tensorboard_events_hold_every_curve(two_runs):
    _, watched, _ = two_runs
    for tag in ("loss/loss", "loss/mae_loss", "loss/bc_loss", "schedule/lr", "schedule/momentum",
                "speed/images_per_sec", "speed/data_wait_frac"):
        assert [s for s, _ in scalars(watched, tag)] == [3, 6], tag
    jsonl = {r["step"]: r["loss"] for r in records(watched) if "loss" in r}
    assert dict(scalars(watched, "loss/loss")) == pytest.approx(jsonl, rel=1e-6)
    assert [s for s, _ in scalars(watched, "knn/top1")] == [2, 4, 6]


@pytest.mark.slow
def test_training_writes_its_curves_and_plot_compares_runs(two_runs, tmp_path):
    plain, watched, _ = two_runs
    for run in (plain, watched):
        with Image.open(run / "curves.png") as img:
            assert img.size[0] > 500
    one = plot_runs([watched], tmp_path / "one.png")
    two = plot_runs([plain, watched], tmp_path / "two.png", labels=["plain", "watched"])
    for png in (one, two):
        with Image.open(png) as img:
            assert img.format == "PNG"
    with pytest.raises(UserError, match="2 labels for 1 runs"):
        plot_runs([plain], tmp_path / "x.png", labels=["a", "b"])
    r = run_cli("plot", str(watched), str(tmp_path), "--out", str(tmp_path / "bad.png"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"lut-fast: error: {tmp_path} has no metrics.jsonl: pass a run folder written by lut-fast train"


@pytest.mark.slow
def test_resume_has_no_duplicate_or_missing_points(tmp_path):
    cfg = tiny_config(tmp_path / "run", "run.log_every=1", "run.ckpt_every=4", "run.knn_every=2", "run.knn_bank=64",
                      "run.knn_val=32", "run.curves=false", max_steps=8)

    def crash(step, record):
        if step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, on_step=crash)
    assert [s for s, _ in scalars(tmp_path / "run", "loss/loss")] == [1, 2, 3, 4, 5, 6]  # written before the crash
    train(cfg, resume=True)
    steps = [r["step"] for r in records(tmp_path / "run")]
    assert steps == list(range(1, 9))
    jsonl = {r["step"]: r for r in records(tmp_path / "run")}
    assert [s for s, _ in scalars(tmp_path / "run", "loss/loss")] == list(range(1, 9))  # 5 and 6 purged, written once
    assert dict(scalars(tmp_path / "run", "loss/loss")) == pytest.approx({s: r["loss"] for s, r in jsonl.items()}, rel=1e-6)
    knn = scalars(tmp_path / "run", "knn/top1")
    assert [s for s, _ in knn] == [2, 4, 6, 8]
    assert dict(knn) == pytest.approx({s: jsonl[s]["knn_top1"] for s in (2, 4, 6, 8)}, abs=1e-4)


def test_knn_check_restores_mode_and_random_state():
    monitor = KnnMonitor(2, None, 32, torch.device("cpu"), bank=40, val=20, threads=1)
    assert monitor.bank_images.shape == (40, 3, 32, 32) and monitor.val_images.shape[0] == 20
    encoder = build_encoder("vit_tiny", img_size=32, patch_size=8, depth=1).train()
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    out = monitor.evaluate(encoder)
    assert encoder.training
    assert torch.equal(states[0], torch.get_rng_state()) and np.array_equal(states[1], np.random.get_state()[1])
    assert states[2] == random.getstate()
    assert 0.0 <= out["knn_top1"] <= 100.0 and out == {**monitor.evaluate(encoder), "knn_seconds": out["knn_seconds"]}
    assert [s for s in range(1, 8) if knn_due(3, s, 7)] == [3, 6, 7] and not knn_due(0, 7, 7)


def test_knn_monitor_needs_labelled_splits(tmp_path):
    (tmp_path / "flat" / "a").mkdir(parents=True)
    cfg = tiny_config(tmp_path / "run", "run.knn_every=2", data__path=str(tmp_path / "flat"))
    with pytest.raises(UserError, match="set run.knn_data to a split root"):
        KnnMonitor.from_config(cfg, torch.device("cpu"))
    with pytest.raises(UserError, match="run.knn_every must be a finite number >= 0"):
        tiny_config(tmp_path / "run", "run.knn_every=-1")


def test_missing_extras_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert open_tensorboard(tmp_path, None, None) is None  # unset: silently off
    assert open_tensorboard(tmp_path, False, None) is None
    with pytest.raises(UserError, match=r"^run.tensorboard=true needs the 'tensorboard' package: pip install 'lut-fast\[tensorboard\]'$"):
        open_tensorboard(tmp_path, True, None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"^--wandb needs the 'wandb' package: pip install 'lut-fast\[wandb\]'$"):
        open_wandb(tmp_path, "p", {}, False)
    # the command line: one line, exit code 2, before any training
    code = ("import sys; sys.modules['wandb'] = None; from lut_fast.cli import main; "
            f"sys.argv = ['lut-fast', 'train', '--wandb', '--device', 'cpu', '--out', {str(tmp_path / 'w')!r}]; main()")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "lut-fast: error: --wandb needs the 'wandb' package: pip install 'lut-fast[wandb]'"


class FakeWandb(types.ModuleType):
    """Records what lut-fast sends to W&B (the real package is an optional extra, and needs no network offline)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.util = types.SimpleNamespace(generate_id=lambda: f"id{len(self.inits)}")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        outer = self

        class Run:
            def log(self, data, step):
                outer.logged.append((step, data))

            def finish(self):
                outer.finished += 1

        return Run()


def test_wandb_sink_logs_by_step_and_resumes_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config(tmp_path / "run", "run.wandb=true", "run.tensorboard=false")
    out = tmp_path / "run"
    out.mkdir()
    with MetricSinks.from_config(cfg, out, 0, enabled=True) as sinks:
        sinks.log({"step": 5, "loss": 1.5, "lr": 0.1, "time": 3.0, "knn_top1": 20.0})
    assert fake.inits[0]["id"] == "id0" and fake.inits[0]["resume"] == "allow" and fake.inits[0]["config"]["run"]["wandb"]
    assert fake.logged == [(5, {"loss/loss": 1.5, "schedule/lr": 0.1, "knn/top1": 20.0})] and fake.finished == 1
    with MetricSinks.from_config(cfg, out, 4, enabled=True):
        pass
    assert fake.inits[1]["id"] == "id0"  # the resumed run continues the same W&B run
    assert MetricSinks.from_config(cfg, out, 0, enabled=False).wandb_run is None  # other ranks log nothing
    assert json.loads(json.dumps(fake.inits[1]["config"]))["method"] == "lut"
