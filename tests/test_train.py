"""The train loop: learns, checkpoints atomically, resumes exactly, stops on NaN."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lut_fast.checkpoint import load_file
from lut_fast.config import TrainConfig, from_dict
from lut_fast.errors import UserError
from lut_fast.train import make_schedule, train

from helpers import tiny_config


def losses(out_dir) -> dict[int, float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_a_few_dozen_steps_lower_the_loss(tmp_path):
    cfg = tiny_config(tmp_path / "run", "run.log_every=1", "optim.lr=2e-3", max_steps=40, optim__batch_size=32)
    result = train(cfg)
    assert result.steps == 40
    curve = losses(tmp_path / "run")
    first = sum(curve[s] for s in range(1, 6)) / 5
    last = sum(curve[s] for s in range(36, 41)) / 5
    assert last < 0.8 * first, (first, last)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "mae_loss", "bc_loss", "lr", "momentum", "images_per_sec", "data_wait_frac"):
        assert key in records[-1]


def test_outputs_config_and_checkpoint_contents(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, "run.ckpt_every=2", "run.keep_checkpoints=2", max_steps=5)
    train(cfg)
    saved = from_dict(TrainConfig, yaml.safe_load((out / "config.yaml").read_text()))
    assert saved == cfg
    ckpt_dir = out / "checkpoints"
    assert (ckpt_dir / "last.pt").resolve().name == "step_00000005.pt"
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == ["step_00000004.pt", "step_00000005.pt"]
    assert not list(ckpt_dir.glob("*.tmp")) and not list(ckpt_dir.glob(".*"))
    ckpt = load_file(ckpt_dir / "last.pt")
    for key in ("model", "target", "optimizer", "scaler", "step", "config", "rng", "schedule"):
        assert key in ckpt
    assert ckpt["step"] == 5 and from_dict(TrainConfig, ckpt["config"]) == cfg


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    # uninterrupted, with 2 loader workers
    full = tiny_config(tmp_path / "full", "run.log_every=1", "run.ckpt_every=4", "data.num_workers=2", max_steps=12)
    train(full)
    # interrupted at step 6 (after the checkpoint at 4), then resumed, with no workers:
    # augmentations and masks depend on (seed, position) only.
    cut = tiny_config(tmp_path / "cut", "run.log_every=1", "run.ckpt_every=4", max_steps=12)

    def crash(step, record):
        if step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cut, on_step=crash)
    assert load_file(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 4
    result = train(cut, resume=True)
    assert result.steps == 12
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 13))  # lines past the checkpoint were replaced, not duplicated
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_resume_without_checkpoint_starts_fresh_and_existing_run_needs_resume(tmp_path):
    cfg = tiny_config(tmp_path / "run", max_steps=2)
    assert train(cfg, resume=True).steps == 2
    with pytest.raises(UserError, match="--resume"):
        train(cfg)


@pytest.mark.slow
def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run", "run.log_every=1", "run.ckpt_every=2", max_steps=8)
    holder = {}

    def poison(step, record):
        if step == 3:  # corrupt the weights after the step-2 checkpoint
            with torch.no_grad():
                next(holder["model"].parameters()).fill_(float("nan"))

    import lut_fast.train as tr

    original = tr.build_task

    def capture(c):
        task = original(c)
        holder["model"] = task.model
        return task

    tr.build_task = capture
    try:
        with pytest.raises(UserError, match="loss became nan at step 4"):
            train(cfg, on_step=poison)
    finally:
        tr.build_task = original
    ckpt = load_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_mae_method_and_gradient_accumulation(tmp_path):
    cfg = tiny_config(tmp_path / "mae", "run.log_every=1", method="mae", optim__accum_steps=2, max_steps=3)
    assert cfg.aug.recipe == "mae"
    result = train(cfg)
    assert result.steps == 3
    rec = json.loads((tmp_path / "mae" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "bc_loss" not in rec and rec["epoch"] == pytest.approx(6 / 30, abs=1e-3)  # 6 micro-batches of 30/epoch


def test_schedule_lr_rule_and_warmup_compression():
    cfg = tiny_config(__import__("pathlib").Path("/tmp/unused"), optim__batch_size=512, optim__accum_steps=2, max_steps=None)
    cfg.optim.epochs, cfg.optim.warmup_epochs = 1600, 40
    s = make_schedule(cfg, batches_per_epoch=2502, world_size=4)  # ImageNet at 4096 per step
    assert s.eff_batch == 4096
    assert s.peak_lr == pytest.approx(2.4e-3)
    assert s.steps_per_epoch == 1251 and s.total_steps == 1600 * 1251
    assert s.warmup_steps == 40 * 1251
    cfg.optim.lr_scaling = "linear"
    assert make_schedule(cfg, 2502, 4).peak_lr == pytest.approx(2.4e-3)
    cfg.optim.max_steps = 1000  # compressed: warm-up keeps its 40/1600 share
    assert make_schedule(cfg, 2502, 4).warmup_steps == 25


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """--compile (torch.compile of the student) trains the same model: losses agree with eager."""
    eager = tiny_config(tmp_path / "eager", "run.log_every=1", max_steps=2, optim__batch_size=8)
    compiled = tiny_config(tmp_path / "compiled", "run.log_every=1", "run.compile=true", max_steps=2, optim__batch_size=8)
    train(eager)
    train(compiled)
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-3), step
