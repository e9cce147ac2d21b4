"""Per-method defaults and provenance: ``--method mae`` gets MAE's recipe unless the user chose otherwise,
and every value says where it came from (header, ``--print-config``)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lut_fast.config import (
    METHOD_DEFAULTS, TrainConfig, defaults_table, format_resolved, from_dict, load_config, lr_description,
    source_lines, to_dict,
)
from lut_fast.errors import UserError
from lut_fast.train import make_schedule

from helpers import TINY_FLAGS, run_cli


def peak_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    return make_schedule(cfg, batches_per_epoch=100, world_size=world_size).peak_lr


def test_mae_gets_the_linear_rule_and_its_own_views_by_the_flag_alone():
    mae = load_config(None, {"method": "mae", "optim.batch_size": 64})
    assert mae.optim.lr_scaling == "linear" and mae.aug.recipe == "mae"
    assert peak_lr(mae) == pytest.approx(1.5e-4 * 64 / 256)  # 3.75e-5, MAE's blr * B / 256
    assert mae.source("optim.lr_scaling") == mae.source("aug.recipe") == "default of method mae"
    lut = load_config(None, {"method": "lut", "optim.batch_size": 64})
    assert lut.optim.lr_scaling == "sqrt" and lut.aug.recipe == "lut"
    assert peak_lr(lut) == pytest.approx(1.5e-4 * 64**0.5 / 4)  # 3e-4, LUT's blr * sqrt(B) / 4
    assert lut.source("optim.lr_scaling") == "default of method lut"
    # Both official rules agree at the paper's batch of 4096.
    assert peak_lr(mae, world_size=64) == pytest.approx(peak_lr(lut, world_size=64)) == pytest.approx(2.4e-3)


def test_only_the_method_dependent_values_change_with_the_method():
    lut, mae = to_dict(load_config(None, {"method": "lut"})), to_dict(load_config(None, {"method": "mae"}))
    differ = {f"{s}.{k}" for s in lut if isinstance(lut[s], dict) for k in lut[s] if lut[s][k] != mae[s][k]}
    assert differ == set(METHOD_DEFAULTS["mae"]) == set(METHOD_DEFAULTS["lut"])
    # the dataclass defaults are LUT's recipe
    plain = to_dict(TrainConfig())
    assert all(plain[k.split(".")[0]][k.split(".")[1]] == v for k, v in METHOD_DEFAULTS["lut"].items())


def test_a_value_the_user_set_wins_over_the_method_default(tmp_path):
    cfg = load_config(None, {"method": "mae", "optim.batch_size": 64}, ["optim.lr_scaling=sqrt"])
    assert cfg.optim.lr_scaling == "sqrt" and cfg.source("optim.lr_scaling") == "--set"
    assert peak_lr(cfg) == pytest.approx(3e-4)
    path = tmp_path / "r.yaml"
    path.write_text("method: mae\noptim:\n  lr_scaling: sqrt\n")
    cfg = load_config(path)
    assert cfg.optim.lr_scaling == "sqrt" and cfg.source("optim.lr_scaling") == f"YAML {path}"
    assert cfg.aug.recipe == "mae" and cfg.source("aug.recipe") == "default of method mae"
    assert cfg.source("method") == f"YAML {path}"
    # a flag changes the method of a YAML file: the new method's defaults follow
    path.write_text("method: mae\n")
    cfg = load_config(path, {"method": "lut"})
    assert (cfg.method, cfg.optim.lr_scaling, cfg.aug.recipe) == ("lut", "sqrt", "lut")
    assert cfg.source("method") == "flag --method" and cfg.source("optim.lr_scaling") == "default of method lut"


def test_views_can_be_chosen_for_mae_but_lut_needs_two():
    ablation = load_config(None, {"method": "mae"}, ["aug.recipe=lut"])  # MAE on simple random crops
    assert ablation.aug.recipe == "lut" and ablation.source("aug.recipe") == "--set"
    with pytest.raises(UserError, match="LUT needs two"):
        load_config(None, {"method": "lut"}, ["aug.recipe=mae"])
    assert load_config(None, {"model.img_size": 64}, ["aug.img_size=64", "model.patch_size=8"]).aug.img_size == 64
    with pytest.raises(UserError, match="aug.img_size 96 differs from model.img_size 64"):
        load_config(None, {"model.img_size": 64}, ["aug.img_size=96", "model.patch_size=8"])
    cfg = load_config(None, {"model.img_size": 64, "model.patch_size": 8})
    assert cfg.aug.img_size == 64 and cfg.source("aug.img_size") == "follows model.img_size"


def test_provenance_strings_and_user_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: vit_small\noptim:\n  betas: [0.9, 0.99]\n")
    cfg = load_config(path, {"optim.batch_size": 8, "model.img_size": 64, "optim.accum_steps": None},
                      ["run.seed=3", "lut={'lam': 0.5}"], flag_names={"model.img_size": "--img-size"})
    assert cfg.source("model.name") == cfg.source("optim.betas") == f"YAML {path}"
    assert cfg.source("optim.batch_size") == "flag --batch-size"  # "--" + the key's last part
    assert cfg.source("model.img_size") == "flag --img-size"
    assert cfg.source("optim.accum_steps") == "default"  # a flag left at None was not given
    assert cfg.source("run.seed") == "--set"
    assert cfg.lut.lam == 0.5 and cfg.source("lut.lam") == "--set"  # a mapping marks each field it gives
    assert cfg.source("lut.direction") == "default"
    assert cfg.user_set("optim.batch_size") and cfg.user_set("optim") and cfg.user_set("model.name")
    assert not cfg.user_set("optim.lr_scaling") and not cfg.user_set("optim.epochs")
    assert not cfg.user_set("data") and not cfg.user_set("aug.img_size") and not cfg.user_set("run.device")
    # every field has a source
    assert set(cfg.sources) == {k for k in _keys(to_dict(cfg))}
    # a whole section given by --set replaces the section: what the YAML set there is gone, and says so
    cfg = load_config(path, None, ["optim={'batch_size': 8}"])
    assert tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.source("optim.betas") == "default"
    assert cfg.source("optim.batch_size") == "--set" and cfg.source("model.name") == f"YAML {path}"


def _keys(tree: dict, prefix: str = "") -> list[str]:
    return [k for key, v in tree.items() for k in (_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]


def test_sources_are_not_part_of_the_saved_recipe():
    cfg = load_config(None, {"method": "mae"}, ["run.seed=1"])
    saved = to_dict(cfg)
    assert "sources" not in saved and "sources" not in yaml.safe_dump(saved)
    again = from_dict(TrainConfig, saved)  # what a checkpoint gives back
    assert again == cfg and again.sources == {}
    assert "sources" not in defaults_table()
    assert source_lines(again) == []  # no provenance to show for a config read back from a checkpoint
    assert "as saved in the run's config" in lr_description(again, 64, 3.75e-5)
    with pytest.raises(UserError, match="unknown config field 'sources'"):
        load_config(None, None, ["sources={}"])
    assert dataclasses.replace(cfg).sources == cfg.sources


def test_lr_description_says_who_set_the_lr():
    cfg = load_config(None, {"method": "mae", "optim.batch_size": 64})
    assert lr_description(cfg, 64, peak_lr(cfg)) == (
        "lr 3.75e-05 (linear rule: blr 0.00015 x 64 / 256; rule: default of method mae)"
    )
    cfg = load_config(None, {"method": "lut"}, ["optim.lr=1e-3"])
    assert lr_description(cfg, 64, peak_lr(cfg)) == "lr 0.001 (set by optim.lr: --set)"
    lines = source_lines(cfg)
    assert lines[0] == "  default of method lut: aug.recipe=lut, optim.lr_scaling=sqrt"
    assert "  flags: method=lut" in lines and "  --set: optim.lr=0.001" in lines
    # A label recorded by later code (not a user choice) is shown too, before what the user set.
    cfg.sources["optim.epochs"] = "default on CPU"
    assert not cfg.user_set("optim.epochs")
    assert source_lines(cfg)[1] == "  default on CPU: optim.epochs=1600.0"


def test_resolved_config_loads_back_as_the_same_config(tmp_path):
    cfg = load_config(None, {"method": "mae", "optim.batch_size": 32},
                      ["model.depth=3", "optim.betas=[0.9, 0.99]", "optim.min_lr=1e-6", "run.out_dir='runs/a b: c'"])
    text = format_resolved(cfg, world_size=2)
    assert "  lr_scaling: linear  # default of method mae\n" in text
    assert "  batch_size: 32  # flag --batch-size\n" in text and "  betas: [0.9, 0.99]  # --set\n" in text
    assert "effective batch 64, lr 3.75e-05 (linear rule" in text
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert to_dict(load_config(path)) == to_dict(cfg)


def test_print_config_prints_sources_and_exits_without_training(tmp_path):
    r = run_cli("train", "--method", "mae", "--batch-size", "64", "--accum", "2", "--set", "optim.lr_scaling=sqrt",
                "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "method: mae  # flag --method" in r.stdout
    assert "  accum_steps: 2  # flag --accum" in r.stdout
    assert "  lr_scaling: sqrt  # --set" in r.stdout and "  recipe: mae  # default of method mae" in r.stdout
    assert "effective batch 128" in r.stdout
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written
    bad = run_cli("train", "--method", "byol", "--print-config", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown method" in bad.stderr


def test_run_header_shows_where_the_recipe_came_from(tmp_path):
    r = run_cli("train", "--method", "mae", *TINY_FLAGS, "--batch-size", "8", "--max-steps", "1", "--device", "cpu",
                "--set", "data.num_workers=0", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "lr 4.69e-06 (linear rule: blr 0.00015 x 8 / 256; rule: default of method mae)" in r.stderr
    assert "  default of method mae: aug.recipe=mae, optim.lr_scaling=linear" in r.stderr
    assert "  flags: method=mae, model.img_size=32" in r.stderr


def test_default_loader_workers_follow_the_machine(monkeypatch):
    """min(8, cores) without CUDA; with CUDA, the cores per local training process minus one, uncapped."""
    import os

    import torch

    from lut_fast.config import DataConfig, default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_num_workers() == 8 and DataConfig().num_workers == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert default_num_workers() == 15  # one GPU: every core but the trainer's
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert default_num_workers() == 1  # 2 cores per GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 processes on this node, whatever the GPU count
    assert default_num_workers() == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers() == 1  # never 0
