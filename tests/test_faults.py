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

import contextlib
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
@pytest.mark.slow
@pytest.mark.multiprocess
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


@pytest.mark.slow
@pytest.mark.multiprocess
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


# ---------------------------------------------------------------- nothing lost: damaged checkpoints, kills mid-write

CLI = str(BIN / "lut-fast")


def cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lut-fast: error:")]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (links as their target name), to show that nothing changed."""
    return {p.name: (os.readlink(p).encode() if p.is_symlink() else p.read_bytes()) for p in sorted(folder.iterdir())}


def test_resume_refuses_when_every_checkpoint_is_unreadable_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, "run.ckpt_every=1", max_steps=2))
    ckpts = out / "checkpoints"
    for p in ckpts.glob("step_*.pt"):
        p.write_bytes(os.urandom(5000))  # garbage, as from a failing disk
    before = folder_bytes(ckpts)
    proc = cli("train", "--out", str(out), "--resume", "--max-steps", "4", "--batch-size", "8", *TINY,
               "--set", "data.num_workers=0")
    line = assert_one_line_error(proc, "cannot resume", "step_00000001.pt", "step_00000002.pt", "move", "another --out")
    assert "last.pt" in line
    assert folder_bytes(ckpts) == before  # not one byte replaced
    assert steps_logged(out) == [1, 2]


def test_resume_skips_an_unreadable_newest_checkpoint_and_keeps_its_bytes(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(out, "run.ckpt_every=2", max_steps=4))
    newest = out / "checkpoints" / "step_00000004.pt"
    garbage = os.urandom(3000)
    newest.write_bytes(garbage)
    result = train(tiny_config(out, "run.ckpt_every=2", max_steps=4), resume=True)
    err = capsys.readouterr().err
    assert "skipped unreadable checkpoint(s)" in err and "resuming from step_00000002.pt" in err
    assert result.steps == 4 and load_file(out / "checkpoints" / "last.pt")["step"] == 4
    assert (out / "checkpoints" / "step_00000004.pt.unreadable").read_bytes() == garbage
    assert steps_logged(out) == [1, 2, 3, 4]


def test_resume_from_a_file_that_is_not_a_lut_fast_checkpoint(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"pos_embed": torch.zeros(1, 17, 192)}, out / "checkpoints" / "last.pt")  # a timm state dict
    before = folder_bytes(out / "checkpoints")
    proc = cli("train", "--out", str(out), "--resume", "--max-steps", "2", "--batch-size", "8", *TINY,
               "--set", "data.num_workers=0")
    assert_one_line_error(proc, "not a lut-fast training checkpoint", "last.pt")
    assert folder_bytes(out / "checkpoints") == before


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_no_temp_file_after_resume(tmp_path):
    """SIGKILL while a checkpoint is written (with a loader worker process): resume removes the temp file."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = ["train", "--out", str(out), "--resume", "--batch-size", "8", "--max-steps", "30", *TINY,
            "--set", "run.ckpt_every=1", "--set", "data.num_workers=1"]
    proc = subprocess.Popen([CLI, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    caught = False
    try:
        end = time.monotonic() + 90
        while time.monotonic() < end and proc.poll() is None:
            if ckpts.is_dir() and any(n.endswith(".tmp") and n.startswith(".step_") for n in os.listdir(ckpts)):
                os.kill(proc.pid, signal.SIGKILL)  # inside the write: the temporary file exists right now
                caught = True
                break
        if not caught:
            wait_for(lambda: len(steps_logged(out)) >= 2, proc)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ours = sorted(n for n in os.listdir(ckpts) if n.endswith(".tmp"))
    if not ours:  # the kill landed between writes this time: leave what a kill inside one leaves
        (ckpts / ".step_00000099.pt.k3x_9zqa.tmp").write_bytes(b"\0" * 4096)
        ours = [".step_00000099.pt.k3x_9zqa.tmp"]
    (ckpts / "notes.tmp").write_text("the user's own file")  # not ours: kept
    done = cli(*args, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"removed {len(ours)} temporary file(s)" in done.stderr
    left = sorted(n for n in os.listdir(ckpts) if n.endswith(".tmp"))
    assert left == ["notes.tmp"], left
    assert load_file(ckpts / "last.pt")["step"] == 30
    assert steps_logged(out) == list(range(1, 31))


def test_a_torn_last_metrics_line_is_dropped_and_reported_on_resume(tmp_path, capsys):
    out = tmp_path / "run"

    def crash(step, record):
        if step == 3:
            raise RuntimeError("disk full, then killed")

    cfg = tiny_config(out, "run.ckpt_every=2", max_steps=5)
    with pytest.raises(RuntimeError):
        train(cfg, on_step=crash)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"loss": 0.51, "st')  # the half line a full disk leaves
    capsys.readouterr()
    result = train(cfg, resume=True)
    assert result.steps == 5
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().err
    assert steps_logged(out) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- a full disk, read-only folders


def fail_writes_like_a_full_disk(monkeypatch, after_bytes: int = 100) -> None:
    """From now on, every write through lut_fast.fileio stores a few bytes and then fails with ENOSPC."""
    import errno

    from lut_fast import fileio

    def full(f, data):
        f.write(data[: min(after_bytes, len(data))])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_raw_write", full)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"

    def disk_fills(step, record):
        if step == 2:  # before the step-2 checkpoint is written
            fail_writes_like_a_full_disk(monkeypatch)

    with pytest.raises(UserError, match=f"no space left on {ckpts}") as err:
        train(tiny_config(out, "run.ckpt_every=1", max_steps=4), on_step=disk_fills)
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert sorted(os.listdir(ckpts)) == ["last.pt", "step_00000001.pt"]  # no partial file, no temp file
    assert load_file(ckpts / "last.pt")["step"] == 1


def test_a_full_disk_while_writing_metrics_leaves_whole_lines(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def disk_fills(step, record):
        if step == 1:
            fail_writes_like_a_full_disk(monkeypatch, after_bytes=7)

    with pytest.raises(UserError, match=f"no space left on {out}"):
        train(tiny_config(out, "run.ckpt_every=100", max_steps=4), on_step=disk_fills)
    monkeypatch.undo()
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(ln)["step"] for ln in text.splitlines()] == [1]


def test_a_full_disk_while_exporting_leaves_no_file(tmp_path, monkeypatch):
    from lut_fast.checkpoint import export_timm_state

    out = tmp_path / "run"
    train(tiny_config(out, max_steps=1))
    fail_writes_like_a_full_disk(monkeypatch)
    with pytest.raises(UserError, match=f"no space left on {tmp_path}"):
        export_timm_state(out / "checkpoints" / "last.pt", tmp_path / "enc.pth")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".enc.pth") or p == "enc.pth"]


def test_out_inside_a_read_only_folder_is_one_line_before_any_work(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        # root ignores permission bits: make the folder refuse new entries the way the kernel would for a user
        import errno

        real_mkdir = os.mkdir

        def mkdir(path, *a, **k):
            if Path(path).parent == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        with pytest.raises(UserError, match="permission denied or read-only") as err:
            train(tiny_config(locked / "run", max_steps=1))
        assert str(locked / "run") in str(err.value)
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- torchrun's agent killed


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an orphan's zombie, waiting for a reaper, counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
@pytest.mark.slow
@pytest.mark.multiprocess
def test_workers_checkpoint_and_stop_when_the_torchrun_agent_is_killed(tmp_path):
    out = tmp_path / "ddp"
    total = 400
    args = ["--batch-size", "4", "--max-steps", str(total), "--set", "run.ckpt_every=1000", "--set", "data.num_workers=1",
            "--out", str(out), *TINY]
    log = (tmp_path / "torchrun.log").open("w")
    proc = subprocess.Popen(torchrun(2, *args), env=ENV, stdout=log, stderr=log)
    try:
        wait_for(lambda: len(steps_logged(out)) >= 3 and len(children_by_rank(proc.pid)) == 2, proc)
        workers = children_by_rank(proc.pid)
        proc.kill()  # SIGKILL to the agent: it cannot pass anything on to its workers
        proc.wait(timeout=30)
        end = time.monotonic() + 90
        while any(alive(pid) for pid in workers.values()) and time.monotonic() < end:
            time.sleep(0.2)
        still = [pid for pid in workers.values() if alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in locals().get("workers", {}).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # only if the test failed: never leave orphans behind
    text = (tmp_path / "torchrun.log").read_text()
    assert not still, f"workers {still} kept training as orphans\n{text[-3000:]}"
    assert "the launcher" in text and "is gone" in text, text[-3000:]
    ckpt = load_file(out / "checkpoints" / "last.pt")
    assert 3 <= ckpt["step"] < total
    assert steps_logged(out) == list(range(1, ckpt["step"] + 1))
