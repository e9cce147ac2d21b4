"""Runs that can be continued, extended and steered, Ctrl-C that saves, and output a cluster log can hold.

CLI-level (a fresh ``lut-fast`` process each) with the tiny model:
- a SLURM-style run (stdout to a file) prints one plain line per ``run.log_every`` steps;
- ``--resume`` applies the changes it allows (moved data, a longer schedule: both printed), refuses the
  rest with the reason, and says when a run has nothing left to do;
- ``--resume-from`` (refused where histories would mix; branches exactly into a new folder) and
  ``--init-from`` (MAE weights continued with LUT; says what was loaded and what is fresh);
- the first Ctrl-C (SIGINT to the process group, workers included) checkpoints and exits 0;
  a second one exits at once (130);
- ``eval linear`` / ``eval finetune`` refuse to run under torchrun.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lut_fast.checkpoint import load_file
from lut_fast.datasets.builtin import CLASSES, builtin_path

from helpers import TINY_FLAGS, run_cli, tiny_config

SMALL = ["--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--set", "data.num_workers=0"]


@pytest.fixture()
def data_folder(tmp_path):
    """Two built-in classes, 20 images each: 5 batches of 8 per epoch."""
    root = tmp_path / "data1"
    src = builtin_path() / "train"
    for cls in CLASSES[:2]:
        (root / cls).mkdir(parents=True)
        for p in sorted((src / cls).glob("*.jpg"))[:20]:
            shutil.copy(p, root / cls / p.name)
    return root


def logged(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def refused(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("lut-fast: error:"))
    for f in fragments:
        assert f in line, line


@pytest.mark.slow
def test_slurm_style_log_lines_and_a_resume_that_listens(tmp_path, data_folder):
    out = tmp_path / "run"
    base = [*TINY_FLAGS, *SMALL, "--out", str(out), "--set", "run.log_every=2", "--set", "run.progress=true"]
    # SLURM-style: stdout to a file (not a terminal), so plain lines although run.progress is true
    log = tmp_path / "slurm.out"
    with log.open("w") as f:
        proc = subprocess.run([str(Path(sys.executable).with_name("lut-fast")), "train", *base, "--data", str(data_folder),
                               "--max-steps", "4"], stdout=f, stderr=subprocess.PIPE, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("step ")]
    assert [int(re.match(r"step (\d+)/4 ", ln).group(1)) for ln in lines] == [2, 4], log.read_text()
    for field in ("loss ", "(mae ", "bc ", "lr ", "img/s", "TFLOP/s", "data wait", "eta "):
        assert field in lines[-1], lines[-1]
    assert "MFU" not in lines[-1]  # no known peak on a CPU

    # the dataset moved, and the run is extended from 4 to 6 steps: both changes are applied and printed
    moved = tmp_path / "moved"
    data_folder.rename(moved)
    proc = ok(run_cli("train", *base, "--data", str(moved), "--max-steps", "6", "--resume"))
    assert f"data.path: '{data_folder}' -> '{moved}'" in proc.stderr
    assert "optim.max_steps: 4 -> 6" in proc.stderr
    assert "schedule extended from 4 to 6 steps" in proc.stderr and "resuming at step 4" in proc.stderr
    ckpt = load_file(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 6 and ckpt["schedule"]["total_steps"] == 6
    assert ckpt["config"]["data"]["path"] == str(moved)
    assert sorted(logged(out)) == [2, 4, 6]

    # the recipe may not change: one line naming the setting and the reason
    refused(run_cli("train", *base, "--resume", "--method", "mae", "--set", "model.depth=3"),
            "cannot change method", "also model.depth", "start a new run")
    refused(run_cli("train", *base, "--resume", "--max-steps", "3"), "step 6", "would end before it")
    refused(run_cli("train", *base, "--resume", "--epochs", "100"), "optim.max_steps=6", "--max-steps")
    # a finished run resumed as it is: said, not silent
    proc = ok(run_cli("train", *base, "--resume"))
    assert "already finished at step 6" in proc.stderr and "--max-steps" in proc.stderr
    assert load_file(out / "checkpoints" / "last.pt")["step"] == 6


@pytest.mark.slow
def test_resume_from_a_chosen_checkpoint_and_init_from_other_weights(tmp_path, data_folder):
    mae = tmp_path / "mae"
    base = [*TINY_FLAGS, *SMALL, "--data", str(data_folder), "--set", "run.log_every=1"]
    ok(run_cli("train", *base, "--method", "mae", "--max-steps", "4", "--out", str(mae),
               "--set", "run.ckpt_every=2", "--set", "run.keep_checkpoints=3"))
    step2 = mae / "checkpoints" / "step_00000002.pt"
    # in its own folder, later checkpoints exist: continuing there would mix two histories
    refused(run_cli("train", *base, "--resume-from", str(step2)), "step_00000004.pt", "--out NEW")
    # into a new folder: the source's metrics up to step 2, then exactly the original steps 3 and 4
    branch = tmp_path / "branch"
    proc = ok(run_cli("train", *base, "--resume-from", str(step2), "--out", str(branch)))
    assert "resuming at step 2" in proc.stderr
    a, b = logged(mae), logged(branch)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    refused(run_cli("train", *base, "--resume-from", str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "x")),
            "not found")

    # MAE weights continued with LUT: encoder and decoder loaded, the LUT heads fresh, a new schedule
    lut = tmp_path / "lut"
    proc = ok(run_cli("train", *base, "--method", "lut", "--max-steps", "2", "--out", str(lut),
                      "--init-from", str(mae / "checkpoints" / "last.pt")))
    assert "loaded decoder, encoder; fresh: predictor, projector" in proc.stderr, proc.stderr
    assert "resuming" not in proc.stderr and load_file(lut / "checkpoints" / "last.pt")["step"] == 2
    refused(run_cli("train", *base, "--method", "lut", "--set", "model.depth=3", "--out", str(tmp_path / "deeper"),
                    "--init-from", str(mae / "checkpoints" / "last.pt")), "--init-from", "blocks.2")


def test_first_ctrl_c_checkpoints_and_exits_cleanly(tmp_path, data_folder):
    out = tmp_path / "run"
    # one DataLoader worker: a terminal's Ctrl-C reaches the whole process group, workers included
    args = [str(Path(sys.executable).with_name("lut-fast")), "train", *TINY_FLAGS, "--batch-size", "8", "--device", "cpu",
            "--data", str(data_folder), "--max-steps", "2000", "--out", str(out),
            "--set", "run.log_every=1", "--set", "data.num_workers=1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        end = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < end, "no progress"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Ctrl-C: saving a checkpoint" in stderr and "stopped early (ctrl-c)" in stderr, stderr
    assert "DataLoader worker" not in stderr and "Traceback" not in stderr, stderr
    step = load_file(out / "checkpoints" / "last.pt")["step"]
    assert 2 <= step < 2000 and max(logged(out)) == step


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path):
    from lut_fast.train import train

    def double_ctrl_c(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "run", "run.ckpt_every=100", max_steps=6), on_step=double_ctrl_c)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("command", ["finetune", "linear"])
def test_linear_probe_and_finetune_refuse_torchrun(tmp_path, command):
    proc = run_cli("eval", command, str(tmp_path / "any.pt"), env={"WORLD_SIZE": "2", "RANK": "1"})
    refused(proc, f"eval {command} runs in a single process", "not under torchrun")


# ---------------------------------------------------------------- what progress.py prints


def test_progress_bar_fits_80_columns_with_a_smoothed_eta():
    from rich.console import Console

    from lut_fast.progress import EtaEstimate, TrainProgress

    console = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None)
    record = {"loss": 0.81234, "mae_loss": 0.7, "bc_loss": 0.11, "lr": 1.2e-3, "images_per_sec": 1234.5,
              "data_wait_frac": 0.12}
    with TrainProgress(True, True, total=1_000_000, start=0, flops_per_image=155.6e9, peak_per_device=989.4,
                       world_size=8, console=console) as progress:
        record.update(progress.throughput(record["images_per_sec"]))
        assert record["tflops"] == pytest.approx(1234.5 * 155.6e9 / 1e12, rel=1e-3)
        assert record["mfu"] == pytest.approx(record["tflops"] / (8 * 989.4), rel=1e-3)
        progress.update(123_456, record)
        info = progress._bar_info(record, 3600.0)
    rendered = console.file.getvalue()
    assert "loss 0.8123" in info and "img/s" in info and "eta 1h00m" in info
    assert all(len(line) <= 80 for line in rendered.replace("\r", "\n").splitlines()), rendered

    eta = EtaEstimate(smoothing=0.3)
    for _ in range(5):
        eta.update(10, 10.0)  # 1 s per step
    eta.update(10, 100.0)  # one slow window (a checkpoint): 10 s per step
    assert eta.remaining(100) == pytest.approx(100 * (1 + 0.3 * 9))


def test_unreadable_images_are_named_and_all_written_to_the_run_folder(tmp_path):
    from types import SimpleNamespace

    from lut_fast.progress import BAD_IMAGES_FILE, TrainProgress

    progress = TrainProgress(True, False, total=10, start=0, flops_per_image=1.0, peak_per_device=None, world_size=1,
                             stream=io.StringIO())
    names = [f"/data/cls/bad_{i}.jpg" for i in range(7)]
    progress.note_bad_images(SimpleNamespace(bad_images=3, bad_paths=names[:3]))
    progress.note_bad_images(SimpleNamespace(bad_images=4, bad_paths=names[3:]))
    msg = progress.bad_images_report(7, tmp_path)
    assert msg.startswith("7 unreadable image(s) were skipped: /data/cls/bad_0.jpg") and " ..." in msg
    assert (tmp_path / BAD_IMAGES_FILE).read_text().splitlines() == names
    assert progress.bad_images_report(0, tmp_path) is None


@pytest.mark.slow
def test_finetune_resumes_from_its_last_epoch(tmp_path, data_folder):
    import lut_fast.evaluation.finetune as ft
    from lut_fast.train import train

    pre = train(tiny_config(tmp_path / "pre", max_steps=2))
    opts = dict(data=str(data_folder), max_steps=8, batch_size=8, workers=0, device="cpu", randaug="none", mixup=0.0,
                cutmix=0.0, reprob=0.0, val_fraction=0.2, show_progress=False)  # 32 train images: 4 steps per epoch
    full = ft.run_finetune(pre.last_checkpoint, out=tmp_path / "full", **opts)

    cut = tmp_path / "cut"
    original, calls = ft.evaluate, []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    ft.evaluate = crash_in_second_epoch
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            ft.run_finetune(pre.last_checkpoint, out=cut, **opts)
    finally:
        ft.evaluate = original
    assert (cut / ft.STATE_FILE).exists()

    cli = ["eval", "finetune", str(pre.last_checkpoint), "--data", str(data_folder), "--out", str(cut), "--max-steps", "8",
           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--randaug", "none", "--mixup", "0", "--cutmix", "0",
           "--reprob", "0", "--val-fraction", "0.2", "--resume"]
    refused(run_cli(*[("16" if a == "8" and cli[i - 1] == "--batch-size" else a) for i, a in enumerate(cli)]),
            "batch_size was 8, now 16")
    proc = ok(run_cli(*cli))
    assert "resuming the fine-tuning at step 4 (epoch 1)" in proc.stderr
    resumed = json.loads((cut / "finetune.json").read_text())
    assert resumed["steps"] == 8 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert len((cut / "finetune_log.jsonl").read_text().splitlines()) == 2
    for a, b in zip(full["history"], resumed["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4) and b["val_top1"] == a["val_top1"]
