"""Typed settings of eval / analyze: defaults <- YAML <- flags <- --set, saved in the result JSON, loaded back."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from lut_fast.errors import UserError
from lut_fast.evaluation.config import (
    AttentionDistanceConfig, AttentionMapsConfig, FinetuneConfig, KnnConfig, LinearConfig, SpectrumConfig,
    format_settings, load_command_config, with_overrides,
)
from lut_fast.records import record_result

ALL = (KnnConfig, LinearConfig, FinetuneConfig, AttentionDistanceConfig, SpectrumConfig, AttentionMapsConfig)


def test_yaml_flags_and_set_resolve_in_order_and_record_their_source(tmp_path):
    yaml_file = tmp_path / "knn.yaml"
    yaml_file.write_text("k: 5\ntemperature: 0.1\npool: mean\n")
    cfg = load_command_config(KnnConfig, yaml_file, {"temperature": 0.2, "workers": None}, ["pool=cls", "seed=3"])
    assert (cfg.k, cfg.temperature, cfg.pool, cfg.seed, cfg.workers) == (5, 0.2, "cls", 3, KnnConfig.workers)
    assert cfg.source("k") == f"YAML {yaml_file}" and cfg.source("temperature") == "flag --temperature"
    assert cfg.source("pool") == "--set" and cfg.source("workers") == "default"
    text = format_settings(cfg, "eval knn")
    assert "k: 5  # YAML" in text and "temperature: 0.2  # flag --temperature" in text


def test_settings_round_trip_through_the_result_json(tmp_path):
    yaml_file = tmp_path / "ft.yaml"
    yaml_file.write_text("epochs: 3\nlayer_decay: 0.7\n")
    cfg = load_command_config(FinetuneConfig, yaml_file, {"batch_size": 32}, ["mixup=0", "randaug=none"])
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not a checkpoint, but a file to hash")
    result = tmp_path / "finetune.json"
    result.write_text(json.dumps({"top1": 50.0}))
    record_result(result, "eval finetune", [ckpt], cfg, {"resume": False})
    saved = json.loads(result.read_text())["protocol"]
    assert saved["config"]["batch_size"] == 32 and saved["config_sources"]["batch_size"] == "flag --batch-size"
    assert saved["settings"]["resume"] is False and saved["settings"]["layer_decay"] == 0.7
    again = load_command_config(FinetuneConfig, result)  # the result JSON as the settings file
    assert again == cfg  # every setting (sources are not compared)
    assert again.source("epochs") == f"YAML {result}"


@pytest.mark.parametrize("cls", ALL)
def test_every_field_has_a_default_and_a_comment(cls):
    from lut_fast.evaluation.config import field_comment

    for f in dataclasses.fields(cls):
        if f.metadata.get("recipe", True):
            assert field_comment(cls, f.name), f"{cls.__name__}.{f.name} has no comment (its --help text)"
    if cls is not AttentionMapsConfig:
        cls().validate()


def test_mistakes_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown config field 'kk'; valid: use_ema, "):
        load_command_config(KnnConfig, None, None, ["kk=3"])
    with pytest.raises(UserError, match="k must be a finite number >= 1"):
        load_command_config(KnnConfig, None, {"k": 0})
    with pytest.raises(UserError, match="unknown pool 'max'"):
        load_command_config(LinearConfig, None, None, ["pool=max"])
    with pytest.raises(UserError, match="even batch size"):
        with_overrides(FinetuneConfig, None, {"batch_size": 15})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_command_config(SpectrumConfig, bad)
    with pytest.raises(UserError, match="must be of type int"):
        load_command_config(AttentionDistanceConfig, None, None, ["max_images=many"])


def test_cli_print_config_shows_yaml_flag_and_set(tmp_path):
    from lut_fast.evaluation.cli import eval_app

    yaml_file = tmp_path / "linear.yaml"
    yaml_file.write_text("epochs: 12\noptimizer: lars\n")
    res = CliRunner().invoke(eval_app, ["linear", str(tmp_path / "unused.pt"), "--config", str(yaml_file),
                                        "--blr", "0.5", "--set", "optimizer=sgd", "--print-config"])
    assert res.exit_code == 0, res.output
    assert f"epochs: 12  # YAML {yaml_file}" in res.output
    assert "blr: 0.5  # flag --blr" in res.output and "optimizer: sgd  # --set" in res.output


def test_every_setting_is_an_option_of_its_command_with_its_default_in_the_help():
    from lut_fast.analysis.cli import analyze_app
    from lut_fast.evaluation.cli import eval_app

    commands = [(eval_app, "knn", KnnConfig), (eval_app, "linear", LinearConfig), (eval_app, "finetune", FinetuneConfig),
                (analyze_app, "attention-distance", AttentionDistanceConfig), (analyze_app, "spectrum", SpectrumConfig),
                (analyze_app, "attention-maps", AttentionMapsConfig)]
    runner = CliRunner()
    for app, name, cls in commands:
        res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"})
        assert res.exit_code == 0, res.output
        for f in dataclasses.fields(cls):
            if f.metadata.get("recipe", True):
                assert f"--{f.name.replace('_', '-')}" in res.output, (name, f.name)
        for flag in ("--config", "--set", "--print-config"):
            assert flag in res.output
    res = runner.invoke(eval_app, ["finetune", "--help"], env={"COLUMNS": "400"})
    assert "Layer-wise lr decay; None = 0.75 (Ti/S), 0.65 (B, L)  (default: none)" in res.output
    assert "--cache" not in res.output and "--no-cache" in runner.invoke(eval_app, ["knn", "--help"], env={"COLUMNS": "400"}).output
