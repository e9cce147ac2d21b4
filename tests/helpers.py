"""Shared helpers for tests: the tiny model every CPU test trains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lut_fast.config import TrainConfig, load_config

TINY_SETS = [
    "model.depth=2",
    "model.decoder_embed_dim=64",
    "model.decoder_depth=1",
    "model.decoder_num_heads=4",
    "model.head_hidden_dim=128",
    "run.progress=false",
]
TINY_FLAGS = ["--img-size", "32", "--patch-size", "8"] + [a for s in TINY_SETS for a in ("--set", s)]


def tiny_config(out: Path, *sets: str, **flags) -> TrainConfig:
    base = {"model.img_size": 32, "model.patch_size": 8, "run.out_dir": str(out), "optim.batch_size": 16,
            "optim.max_steps": 6, "run.device": "cpu"}
    aliases = {"max_steps": "optim.max_steps"}
    base.update({aliases.get(k, k.replace("__", ".")): v for k, v in flags.items()})
    return load_config(None, base, TINY_SETS + ["data.num_workers=0", "optim.epochs=10", "optim.warmup_epochs=1"] + list(sets))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``lut-fast`` as a user would (a fresh process, the installed entry point)."""
    exe = Path(sys.executable).with_name("lut-fast")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
