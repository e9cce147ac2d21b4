"""The task interface (lut_fast/tasks/) and the one train step (lut_fast/step.py), on a tiny model, CPU."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from helpers import tiny_config

from lut_fast.config import METHODS
from lut_fast.pipelines.batch import Batch
from lut_fast.step import Schedule, build_train_state, seed_everything, train_step
from lut_fast.tasks import TASKS, LUTTask, MAETask, build_task

REPO = Path(__file__).resolve().parents[1]


def _state(cfg):
    seed_everything(cfg.run.seed)
    task = build_task(cfg)
    sched = Schedule(steps_per_epoch=10, total_steps=10, warmup_steps=2, peak_lr=1e-3, eff_batch=cfg.optim.batch_size)
    return build_train_state(cfg, task, sched, torch.device("cpu"), None)


def _batches(cfg, n: int, seed: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.optim.batch_size, 3, cfg.model.img_size, cfg.model.img_size)
    return [Batch(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.zeros(shape[0], dtype=torch.long))
            for _ in range(n)]


def test_every_method_has_a_task_and_the_registry_builds_it(tmp_path):
    assert set(TASKS) == set(METHODS)
    assert isinstance(build_task(tiny_config(tmp_path, method="mae")), MAETask)
    assert isinstance(build_task(tiny_config(tmp_path, method="lut")), LUTTask)


def test_lambda_zero_is_decided_by_the_lut_task(tmp_path):
    zero = build_task(tiny_config(tmp_path, "lut.lam=0"))
    assert zero.target is None and zero.find_unused_parameters and zero.extra_state() == {"target": None}
    assert zero.replicated_tensors() == []
    one = build_task(tiny_config(tmp_path, "lut.lam=1.0"))
    assert one.target is not None and not one.find_unused_parameters and one.replicated_tensors()
    mae = MAETask.from_config(tiny_config(tmp_path, method="mae"))
    assert not mae.find_unused_parameters
    # TFLOP/s and MFU count what runs: with lambda = 0 that is MAE's step, no target pass
    mae_flops = mae.training_flops_per_image(tiny_config(tmp_path, method="mae"))
    assert zero.training_flops_per_image(tiny_config(tmp_path, "lut.lam=0")) == mae_flops
    assert one.training_flops_per_image(tiny_config(tmp_path, "lut.lam=1.0")) > 2 * mae_flops


def test_lambda_zero_flops_are_the_baselines_for_lut_on_simmim_too(tmp_path):
    simmim = tiny_config(tmp_path, method="simmim")
    zero = tiny_config(tmp_path, "lut.lam=0", method="lut_simmim")
    assert build_task(zero).training_flops_per_image(zero) == build_task(simmim).training_flops_per_image(simmim)


def test_the_loop_step_and_bench_never_ask_which_method_they_run():
    asks = []
    for path in (REPO / "lut_fast").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("lut_fast/models/", "lut_fast/tasks/")):
            continue
        asks += [f"{rel}: {ln.strip()}" for ln in path.read_text().splitlines() if re.search(r"isinstance\(.*LUT", ln)]
    assert not asks, asks


def test_mae_step_logs_losses_and_lr_lut_step_adds_the_momentum_and_moves_the_target(tmp_path):
    mae = _state(tiny_config(tmp_path, method="mae"))
    metrics = train_step(mae, _batches(mae.cfg, 1))
    assert set(metrics) == {"loss", "mae_loss", "lr"} and mae.step == 1 and metrics["lr"] == 0.0  # warm-up starts at 0

    lut = _state(tiny_config(tmp_path, "lut.lam=1.0"))
    before = [p.clone() for p in lut.task.target.parameters()]
    train_step(lut, _batches(lut.cfg, 1))
    metrics = train_step(lut, _batches(lut.cfg, 1, seed=2))
    assert {"loss", "mae_loss", "bc_loss", "lr", "momentum"} <= set(metrics) and 0.99 < metrics["momentum"] < 1
    assert any(not torch.equal(a, b) for a, b in zip(before, lut.task.target.parameters()))


def test_train_state_round_trips_through_its_state_dict(tmp_path):
    """What a checkpoint holds is enough to continue with the same losses (and has every key old ones had)."""
    cfg = tiny_config(tmp_path)
    batches = _batches(cfg, 4)
    a = _state(cfg)
    for b in batches[:2]:
        train_step(a, [b])
    saved = copy.deepcopy(a.state_dict())  # as written to disk: later steps change the live tensors
    assert {"model", "target", "optimizer", "scaler", "rng", "schedule", "config", "step", "world_size"} <= set(saved)
    after = [train_step(a, [b])["loss"].item() for b in batches[2:]]

    b_state = _state(cfg)
    b_state.load_state_dict(saved)
    assert b_state.step == 2
    assert [train_step(b_state, [b])["loss"].item() for b in batches[2:]] == after


def test_accumulation_is_the_mean_gradient_of_its_micro_batches(tmp_path, monkeypatch):
    """Two micro-batches of 8 reach the update with the gradient of one batch of 16 (MAE: no batch statistics)."""
    import lut_fast.step as step_module

    grads: list[list[torch.Tensor]] = []
    original = step_module.apply_update

    def recording(optimizer, scaler, lr, clip, params, step):
        params = list(params)
        grads.append([p.grad.clone() for p in params if p.grad is not None])
        return original(optimizer, scaler, lr, clip, params, step)

    monkeypatch.setattr(step_module, "apply_update", recording)
    cfg_two = tiny_config(tmp_path, method="mae", optim__batch_size=8, optim__accum_steps=2)
    cfg_one = tiny_config(tmp_path, method="mae", optim__batch_size=16)
    big = _batches(cfg_one, 1)[0]
    halves = [Batch(big.view1[:8], None, big.labels[:8]), Batch(big.view1[8:], None, big.labels[8:])]
    two, one = _state(cfg_two), _state(cfg_one)
    # the same masks: micro-step i of the accumulated step gets rows 8i.. of the one batch's noise
    noise = one.task.noise(16, cfg_one.run.seed, 0)
    two.task.noise = lambda rows, seed, micro: noise[micro * 8:(micro + 1) * 8]
    train_step(two, halves)
    train_step(one, [big])
    assert len(grads) == 2 and len(grads[0]) == len(grads[1]) > 0
    for g_two, g_one in zip(*grads):
        torch.testing.assert_close(g_two, g_one, rtol=1e-4, atol=1e-7)
