"""The CLI as a user meets it: bad input gives one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from lut_fast.datasets.builtin import CLASSES, builtin_path
from lut_fast.errors import UserError

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
    # every field's type, length and range, before torch sees it
    (["--set", "optim.weight_decay=-0.05"], "optim.weight_decay must be a finite number >= 0"),
    (["--set", "optim.lr=-1e-3"], "optim.lr (learning rate) must be a finite number > 0"),
    (["--set", "optim.lr=.nan"], "optim.lr (learning rate) must be a finite number > 0, got nan"),
    (["--set", "optim.blr=-1"], "optim.blr (base learning rate) must be a finite number > 0"),
    (["--set", "optim.blr=.nan"], "optim.blr (base learning rate) must be a finite number > 0"),
    (["--set", "optim.betas=[0.9]"], "optim.betas must have 2 values"),
    (["--set", "optim.betas=[0.9,1.0]"], "optim.betas values must be a finite number in [0, 1)"),
    (["--set", "optim.betas=[-0.1,0.9]"], "optim.betas values must be a finite number in [0, 1)"),
    (["--set", "aug.mean=[0.5]"], "aug.mean must have 3 values"),
    (["--set", "aug.std=[0.2]"], "aug.std must have 3 values"),
    (["--set", "aug.std=[0.2,0.2,0]"], "aug.std values must be a finite number > 0"),
    (["--set", "optim.batch_size=true"], "optim.batch_size must be of type int"),
    (["--set", "run.seed=-1"], "run.seed must be a finite number in [0, 4294967295]"),
    (["--set", "lut.ema_momentum=1.5"], "lut.ema_momentum must be a finite number in [0, 1]"),
]


@pytest.mark.parametrize("args,message", BAD_CONFIGS, ids=[m.split()[1] + str(i) for i, (_, m) in enumerate(BAD_CONFIGS)])
def test_impossible_configs_are_rejected_clearly(tmp_path, args, message):
    assert_clean_error(run_cli("train", "--out", str(tmp_path / "o"), *args), message)


@pytest.mark.slow
def test_missing_and_empty_data_folders(tmp_path):
    assert_clean_error(run_cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "data folder", "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")), "no class folders")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("hello")
    assert_clean_error(run_cli("train", "--data", str(tmp_path / "noimg"), "--out", str(tmp_path / "o")), "no images found")


@pytest.mark.slow
def test_bad_config_file(tmp_path):
    assert_clean_error(run_cli("train", str(tmp_path / "missing.yaml")), "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert_clean_error(run_cli("train", str(bad)), "not valid YAML")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("modle:\n  name: vit_small\n")
    assert_clean_error(run_cli("train", str(wrong)), "unknown config field 'modle'")


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_an_lr_so_large_the_update_overflows_stops_like_a_nan_loss(tmp_path):
    proc = run_cli("train", "--out", str(tmp_path / "o"), "--max-steps", "3", "--batch-size", "8", *TINY_FLAGS,
                   "--set", "data.num_workers=0", "--set", "optim.lr=1e39")
    assert_clean_error(proc, "became inf at step 1", "stopping; the last good checkpoint is kept in")


# ---------------------------------------------------------------- output paths


def test_output_paths_that_are_files_or_folders_are_one_line(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file the user keeps")
    train = ["train", "--max-steps", "1", "--batch-size", "8", *TINY_FLAGS, "--set", "data.num_workers=0"]
    assert_clean_error(run_cli(*train, "--out", str(taken)), f"output folder {taken} is an existing file")
    assert taken.read_text() == "a file the user keeps"
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    assert_clean_error(run_cli(*train, "--out", str(run)), f"checkpoint folder {run / 'checkpoints'} is an existing file")
    assert (run / "checkpoints").read_text() == "not a folder"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli("train", "--out", str(out), "--max-steps", "1", "--batch-size", "8", *TINY_FLAGS, "--set", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoints" / "last.pt"


def test_export_refuses_a_folder_target_and_an_existing_file_without_overwrite(tmp_path, trained):
    assert_clean_error(run_cli("export", "timm", str(trained), str(tmp_path)), f"{tmp_path} is a folder")
    target = tmp_path / "enc.pth"
    target.write_bytes(b"an older export")
    assert_clean_error(run_cli("export", "timm", str(trained), str(target)), "already exists", "--overwrite")
    assert target.read_bytes() == b"an older export"
    proc = run_cli("export", "timm", str(trained), str(target), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert set(torch.load(target, map_location="cpu")) >= {"pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc1.weight"}


def test_export_of_a_file_without_vit_weights_fails_and_writes_nothing(tmp_path):
    src = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, src)
    assert_clean_error(run_cli("export", "timm", str(src), str(tmp_path / "enc.pth")), "cannot export", "not a ViT encoder")
    torch.save({"format": "lut-fast/1", "model": {"decoder.weight": torch.zeros(2)}, "step": 1}, tmp_path / "empty.pt")
    assert_clean_error(run_cli("export", "timm", str(tmp_path / "empty.pt"), str(tmp_path / "enc.pth")), "no ViT encoder weights")
    assert not (tmp_path / "enc.pth").exists()


def test_export_prints_the_timm_call_that_loads_the_file(tmp_path, trained):
    exported = tmp_path / "enc.pth"
    proc = run_cli("export", "timm", str(trained), str(exported))
    assert proc.returncode == 0, proc.stderr
    lines = [ln.strip() for ln in proc.stdout.splitlines()]
    call = next(ln for ln in lines if ln.startswith("model = timm.create_model("))
    load = next(ln for ln in lines if ln.startswith("model.load_state_dict("))
    assert "img_size=32" in call and "patch_size=8" in call and "depth=2" in call and 'global_pool="avg"' in call
    scope = {"timm": timm, "torch": torch}
    exec(call, scope)  # the printed lines, run as printed: strict loading must succeed
    exec(load, scope)
    assert scope["model"](torch.zeros(1, 3, 32, 32)).shape == (1, 192)


# ---------------------------------------------------------------- ImageFolder trees with links and locked folders


def test_symlink_loops_and_broken_links_in_an_imagefolder_tree(tmp_path, small_folder):
    from lut_fast.datasets.imagefolder import scan_image_folder

    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    real = len(scan_image_folder(data).samples)
    cls = data / CLASSES[0]
    (cls / "loop").symlink_to(cls, target_is_directory=True)  # a loop: followed once, not 40 times
    (cls / "up").symlink_to(data, target_is_directory=True)
    (cls / "twice.jpg").symlink_to(sorted(cls.glob("*.jpg"))[0])  # the same real file again
    (cls / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (cls / "self.jpg").symlink_to(cls / "self.jpg")
    index = scan_image_folder(data)
    paths = [p for p, _ in index.samples]
    assert len(paths) == real + 2  # the two broken links: kept, so the loader skips and counts them
    assert {Path(p).name for p in paths} >= {"dangling.jpg", "self.jpg"}
    proc = run_cli("train", "--data", str(data), "--out", str(tmp_path / "o"), "--batch-size", "8", "--max-steps", "6",
                   *TINY_FLAGS, "--set", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "unreadable image(s) were skipped" in proc.stderr
    # the run names them: the first few on stderr, all of them in the run folder
    named = (tmp_path / "o" / "bad_images.txt").read_text().splitlines()
    assert named and {Path(p).name for p in named} <= {"dangling.jpg", "self.jpg"}, named
    assert any(Path(p).name in proc.stderr for p in named)


def test_a_class_folder_that_cannot_be_read_is_an_error_naming_it(tmp_path, small_folder, monkeypatch):
    import errno

    from lut_fast.datasets import imagefolder

    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    locked = data / CLASSES[1]
    locked.chmod(0o000)
    try:
        if os.access(locked, os.R_OK):
            # root reads through permission bits: deny the listing the way the kernel does for other users
            real_list = imagefolder._list_dir

            def list_dir(path):
                if Path(path) == locked:
                    raise PermissionError(errno.EACCES, "Permission denied", path)
                return real_list(path)

            monkeypatch.setattr(imagefolder, "_list_dir", list_dir)
        with pytest.raises(UserError, match=f"cannot read the folder {locked} \\(permission denied\\)"):
            imagefolder.scan_image_folder(data)
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- the first run on a CPU


def test_a_cpu_run_without_a_chosen_model_uses_the_small_cpu_recipe(tmp_path):
    import yaml

    from lut_fast.config import CPU_RECIPE, load_config

    cfg = load_config(None, {"run.device": "cpu"}, [], cpu_recipe=True)
    assert (cfg.model.img_size, cfg.model.depth, cfg.model.decoder_depth) == (64, 4, 2) and "make demo" in cfg.recipe_note
    chosen = load_config(None, {"run.device": "cpu", "model.name": "vit_small"}, [], cpu_recipe=True)
    assert (chosen.model.img_size, chosen.model.decoder_depth, chosen.recipe_note) == (224, 8, "")
    kept = load_config(None, {"run.device": "cpu", "optim.batch_size": 16}, ["optim.blr=1e-3"], cpu_recipe=True)
    assert (kept.optim.batch_size, kept.optim.lr, kept.model.img_size) == (16, None, 64)  # the user's values stay
    # the recipe is the one `make demo` runs
    demo = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    for key, value in CPU_RECIPE.items():
        section, name = key.split(".")
        assert demo[section][name] == value, key
    proc = run_cli("train", "--out", str(tmp_path / "o"), "--device", "cpu", "--max-steps", "1",
                   "--set", "data.num_workers=0", "--set", "run.progress=false")
    assert proc.returncode == 0, proc.stderr
    header = proc.stderr
    assert "64px/p8" in header and "small CPU recipe" in header and "--model vit_base" in header


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
