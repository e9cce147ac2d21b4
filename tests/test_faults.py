"""Faults that days of training bring: killed workers, pre-emption (SIGTERM), time budgets.

- A worker killed (SIGKILL from outside) under ``torchrun --max-restarts 1``:
  torchrun restarts the group, the restarted workers resume from the last
  checkpoint by themselves (TORCHELASTIC_RESTART_COUNT > 0, no --resume
  given), and the run ends with the right step count, a loadable checkpoint,
  one metrics line per step, and the losses of one process with the same
  global batch.
- SIGTERM to torchrun (with DataLoader worker processes, which get the
  signal too) or to a single process: a checkpoint, then a clean end; the
  same command with --resume finishes the run.
- ``--max-hours``, resume without a checkpoint, refusing to overwrite a run,
  and refusing to resume with another number of processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lut_fast.checkpoint import load_file
from lut_fast.config import load_config
from lut_fast.errors import UserError
from lut_fast.train import train

BIN = Path(sys.executable).parent
TINY_SETS = [
    "model.depth=2", "model.decoder_depth=1", "model.decoder_embed_dim=64", "model.decoder_num_heads=4",
    "model.head_hidden_dim=128", "run.progress=false", "run.log_every=1",
]
TINY = ["--img-size", "32", "--patch-size", "8", "--device", "cpu", "--precision", "fp32"]
TINY += [a for s in TINY_SETS for a in ("--set", s)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("TORCHELASTIC_RESTART_COUNT", None)


def torchrun(nproc: int, *args: str, restarts: int = 0) -> list[str]:
    return [
        str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={restarts}",
        "--monitor-interval=0.2", "-m", "lut_fast.cli", "train", *args,
    ]


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before the fault could be injected")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run to make progress")
        time.sleep(0.02)


def children_by_rank(parent: int) -> dict[int, int]:
    """pid of each worker that ``parent`` (torchrun) started, by its RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs: one thread, like the subprocesses (OMP_NUM_THREADS=1); 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(out: Path, *sets: str, max_steps: int):
    flags = {"model.img_size": 32, "model.patch_size": 8, "run.out_dir": str(out), "optim.batch_size": 8,
             "optim.max_steps": max_steps, "run.device": "cpu", "run.precision": "fp32"}
    return load_config(None, flags, TINY_SETS + ["data.num_workers=0"] + list(sets))


# ---------------------------------------------------------------- a worker killed under torchrun


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_killed_worker_is_restarted_by_torchrun_and_the_run_completes(tmp_path):
    total, every = 16, 4
    run = ["--batch-size", "4", "--max-steps", str(total), "--set", f"run.ckpt_every={every}", "--set", "data.num_workers=1"]
    out = tmp_path / "ddp"
    log = (tmp_path / "torchrun.log").open("w")
    # no --resume: the restarted workers must resume on their own
    proc = subprocess.Popen(torchrun(2, *run, "--out", str(out), *TINY, restarts=1), env=ENV, stdout=log, stderr=log)
    try:
        wait_for(lambda: (out / "checkpoints" / f"step_{every:08d}.pt").exists() and max(steps_logged(out)) > every, proc)
        victim = children_by_rank(proc.pid)[1]
        killed_at = max(steps_logged(out))
        os.kill(victim, signal.SIGKILL)
        rc = proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "torchrun.log").read_text()
    assert rc == 0, text[-4000:]
    assert killed_at < total, "the kill came after the run had finished"
    assert "resuming at step" in text, "the restarted workers did not resume from the checkpoint"
    ckpt = load_file(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == total and ckpt["world_size"] == 2
    model = ckpt["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    # lines past the checkpoint written before the kill were dropped on resume: one line per step
    assert steps_logged(out) == list(range(1, total + 1))

    # the losses are those of one uninterrupted process with the same global batch (8)
    ref = tmp_path / "ref"
    single = [str(BIN / "lut-fast"), "train", "--batch-size", "8", "--max-steps", str(total), "--out", str(ref), *TINY,
              "--set", "data.num_workers=0"]
    done = subprocess.run(single, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    a = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert b == pytest.approx(a, rel=1e-4)


# ---------------------------------------------------------------- SIGTERM (pre-emption)


def test_sigterm_to_torchrun_checkpoints_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "ddp"
    # DataLoader worker processes: torchrun signals the whole process group, they must not die first
    total = 40
    args = ["--batch-size", "4", "--max-steps", str(total), "--set", "run.ckpt_every=1000", "--set", "data.num_workers=1",
            "--out", str(out), "--resume", *TINY]
    log = (tmp_path / "torchrun.log").open("w")
    proc = subprocess.Popen(torchrun(2, *args), env=ENV, stdout=log, stderr=log)
    try:
        wait_for(lambda: len(steps_logged(out)) >= 3, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "torchrun.log").read_text()
    # torchrun itself reports the signal (exit code 1); the workers saved and exited cleanly
    assert "stopped early (sigterm)" in text, text[-4000:]
    assert "DataLoader worker" not in text, text[-4000:]
    ckpt = load_file(out / "checkpoints" / "last.pt")
    stopped_at = ckpt["step"]
    assert 3 <= stopped_at < total
    assert steps_logged(out) == list(range(1, stopped_at + 1))

    # the same launch line (it always passes --resume) finishes the run
    done = subprocess.run(torchrun(2, *args), env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming at step {stopped_at}" in done.stderr
    assert load_file(out / "checkpoints" / "last.pt")["step"] == total
    assert steps_logged(out) == list(range(1, total + 1))


def test_sigterm_in_a_single_process_checkpoints_and_resume_finishes(tmp_path):
    out = tmp_path / "run"

    def pre_empt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    result = train(tiny_config(out, "run.ckpt_every=100", max_steps=8), on_step=pre_empt)
    assert result.stopped_early == "sigterm" and result.steps == 3
    assert load_file(out / "checkpoints" / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's handler is gone again
    result = train(tiny_config(out, "run.ckpt_every=100", max_steps=8), resume=True)
    assert result.steps == 8 and not result.stopped_early
    assert steps_logged(out) == list(range(1, 9))


def test_max_hours_ends_cleanly_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(out, "run.ckpt_every=100", "run.max_hours=1e-9", max_steps=50))
    assert result.stopped_early == "max_hours" and result.steps == 1
    assert load_file(out / "checkpoints" / "last.pt")["step"] == 1


# ---------------------------------------------------------------- resume rules


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    result = train(tiny_config(tmp_path / "new", max_steps=2), resume=True)
    assert result.steps == 2 and steps_logged(tmp_path / "new") == [1, 2]


def test_a_torchrun_restart_resumes_by_itself_and_a_plain_rerun_refuses(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def crash(step, record):
        if step == 3:  # after the checkpoint at step 2
            raise RuntimeError("worker died")

    cfg = tiny_config(out, "run.ckpt_every=2", max_steps=5)
    with pytest.raises(RuntimeError, match="worker died"):
        train(cfg, on_step=crash)
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun sets in restarted workers
    result = train(cfg)
    assert result.steps == 5 and steps_logged(out) == [1, 2, 3, 4, 5]


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, max_steps=2))
    path = (out / "checkpoints" / "last.pt").resolve()
    ckpt = torch.load(path, weights_only=False)
    ckpt["world_size"] = 2
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="2 process"):
        train(tiny_config(out, max_steps=4), resume=True)
