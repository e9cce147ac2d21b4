"""The CLI as a user meets it: bad input gives one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch
from PIL import Image

from lut_fast.datasets.builtin import CLASSES, builtin_path

from helpers import TINY_FLAGS, run_cli


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lut-fast: error:")]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """Two classes of the built-in data, plus room for bad files."""
    root = tmp_path_factory.mktemp("small")
    src = builtin_path() / "train"
    for cls in CLASSES[:2]:
        (root / cls).mkdir()
        for p in sorted((src / cls).glob("*.jpg"))[:20]:
            shutil.copy(p, root / cls / p.name)
    return root


def corrupt_copy(src, dst, n_bad):
    shutil.copytree(src, dst)
    victims = sorted(dst.rglob("*.jpg"))[:n_bad]
    for p in victims:
        p.write_bytes(p.read_bytes()[:200])  # truncated JPEG
    return victims


BAD_CONFIGS = [
    (["--model", "vit_huge"], "unknown model 'vit_huge'"),
    (["--set", "model.mask_ratio=1.2"], "mask ratio must be in (0, 1)"),
    (["--set", "model.mask_ratio=0"], "mask ratio must be in (0, 1)"),
    (["--batch-size", "0"], "batch size must be positive"),
    (["--img-size", "30", "--patch-size", "8"], "not divisible by patch size"),
    (["--method", "simclr"], "unknown method"),
    (["--set", "optim.nope=1"], "unknown config field 'optim.nope'"),
    (["--precision", "fp8"], "unknown precision"),
    (["--backend", "tfrecord"], "unknown backend"),
]


@pytest.mark.parametrize("args,message", BAD_CONFIGS, ids=[m.split()[1] + str(i) for i, (_, m) in enumerate(BAD_CONFIGS)])
def test_impossible_configs_are_rejected_clearly(tmp_path, args, message):
    assert_clean_error(run_cli("train", "--out", str(tmp_path / "o"), *args), message)


def test_missing_and_empty_data_folders(tmp_path):
    assert_clean_error(run_cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "data folder not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")), "no class folders")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("hello")
    assert_clean_error(run_cli("train", "--data", str(tmp_path / "noimg"), "--out", str(tmp_path / "o")), "no images found")


def test_bad_config_file(tmp_path):
    assert_clean_error(run_cli("train", str(tmp_path / "missing.yaml")), "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert_clean_error(run_cli("train", str(bad)), "not valid YAML")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("modle:\n  name: vit_small\n")
    assert_clean_error(run_cli("train", str(wrong)), "unknown config field 'modle'")


def test_corrupt_images_are_skipped_counted_and_limited(tmp_path, small_folder):
    data = tmp_path / "data"
    corrupt_copy(small_folder, data, 3)
    (data / CLASSES[0] / "empty.jpg").write_bytes(b"")  # zero-byte: dropped at scan time
    Image.new("RGB", (40, 30), "red").save(data / CLASSES[1] / "extra.png")  # PNGs are fine
    ok = run_cli("train", "--data", str(data), "--out", str(tmp_path / "ok"), "--batch-size", "8", "--max-steps", "6",
                 *TINY_FLAGS, "--set", "data.num_workers=0")
    assert ok.returncode == 0, ok.stderr
    assert "unreadable image(s) were skipped" in ok.stderr
    limited = run_cli("train", "--data", str(data), "--out", str(tmp_path / "limited"), "--batch-size", "8", "--max-steps", "6",
                      *TINY_FLAGS, "--set", "data.num_workers=0", "--set", "data.max_bad_images=0")
    assert_clean_error(limited, "unreadable images", "max_bad_images")


def test_train_export_and_timm_load_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--out", str(out), "--max-steps", "3", "--batch-size", "8", *TINY_FLAGS, "--set", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr
    assert f"results in {out}" in proc.stderr.replace("\n", "")
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists() and (out / "checkpoints" / "last.pt").exists()
    exported = tmp_path / "enc.pth"
    proc = run_cli("export", "timm", str(out / "checkpoints" / "last.pt"), str(exported))
    assert proc.returncode == 0, proc.stderr
    state = torch.load(exported, map_location="cpu")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2)
    model.load_state_dict(state, strict=True)
    assert_clean_error(run_cli("export", "timm", str(tmp_path / "none.pt"), str(exported)), "checkpoint not found")


def test_data_builtin_writes_an_imagefolder_tree(tmp_path):
    proc = run_cli("data", "builtin", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    from torchvision.datasets import ImageFolder

    train, val = ImageFolder(str(tmp_path / "b" / "train")), ImageFolder(str(tmp_path / "b" / "val"))
    assert train.classes == sorted(CLASSES) and len(train) == 480 and len(val) == 160
    sizes = {Image.open(p).size for p, _ in train.samples[::25]}
    assert len(sizes) >= 3  # a few sizes and aspect ratios


def test_every_command_has_help_with_defaults():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    for flag in ("--method", "--model", "--img-size", "--patch-size", "--data", "--backend", "--batch-size", "--accum",
                 "--epochs", "--max-steps", "--out", "--resume", "--compile", "--precision", "--device", "--seed"):
        assert flag in proc.stdout, flag
    assert "default" in proc.stdout


# ---------------------------------------------------------------- --version and shell completion


def test_version_and_shell_completion():
    from importlib.metadata import version

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"lut-fast {version('lut-fast')}", proc.stderr
    # typer finds the shell among the parent processes: run it from bash, as a user would
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("lut-fast")
    proc = subprocess.run(["bash", "-c", f"'{exe}' --show-completion; exit $?"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "_LUT_FAST_COMPLETE" in proc.stdout and "complete " in proc.stdout, proc.stdout
