"""Eval records: the full protocol of an ``eval`` / ``analyze`` result, saved inside its JSON.

Every result file those commands write (``knn.json``, ``linear.json``,
``finetune.json``, ``attention_distance.json``, ``spectrum.json``,
``attention_maps.json``) gets a ``protocol`` entry: which command, with every
setting it ran with (defaults included); each checkpoint's path, sha256,
training step and method; a fingerprint of the data (the number of files and
a sha256 of their sorted relative paths, so a changed or different copy of a
dataset shows); the package version, torch version and the git commit of the
code when it runs from a git checkout; and when. ``lut-fast report`` reads it
to match results to their runs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from lut_fast.errors import UserError

SCHEMA = "lut-fast-record/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(data: str | os.PathLike | None) -> dict:
    """File count and sha256 of the sorted listing of ``data`` (None = the built-in dataset).

    A folder lists every file below it by relative path; a single file (a
    ``.beton``, an image) is listed by name and size, since hashing its
    content could take longer than the evaluation.
    """
    if data is None:
        from lut_fast.datasets.builtin import builtin_path

        root, source = Path(builtin_path()), "built-in"
    else:
        root, source = Path(data).expanduser(), str(data)
    if not root.exists():
        raise UserError(f"data not found: {root}")
    if root.is_file():
        listing = [f"{root.name}\t{root.stat().st_size}"]
    else:
        listing = sorted(
            os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            for folder, _, names in os.walk(root, followlinks=True) for name in names
        )
    digest = hashlib.sha256("".join(line + "\n" for line in listing).encode()).hexdigest()
    return {"source": source, "path": str(root.resolve()), "files": len(listing), "listing_sha256": digest}


def checkpoint_record(path: str | os.PathLike) -> dict:
    """Path (as given, made absolute; and the file it resolves to), size, sha256, step and method."""
    from lut_fast.checkpoint import load_file

    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    step = method = None
    try:
        ckpt = load_file(p)
        if isinstance(ckpt, dict) and "format" in ckpt:
            step, method = ckpt.get("step"), (ckpt.get("config") or {}).get("method")
    except UserError:
        pass
    return {
        "path": os.path.abspath(p), "resolved": str(p.resolve()), "bytes": p.stat().st_size,
        "sha256": sha256_file(p), "step": step, "method": method,
    }


def git_commit(folder: Path) -> Optional[dict]:
    """The commit (and whether the tree has changes) when ``folder`` is the top of a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        # The installed package's folder may sit inside some other repository (a venv in a checkout): only
        # a checkout whose top is the package's own source root counts.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != folder.resolve():
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def software() -> dict:
    import torch

    import lut_fast

    return {
        "lut_fast": lut_fast.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
        "git": git_commit(Path(lut_fast.__file__).resolve().parent.parent),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def protocol(command: str, ckpts: Iterable[str | os.PathLike], data: Any, settings: dict, extra_data: dict | None = None,
             config: Any = None) -> dict:
    """The record of one evaluation: command, settings, checkpoints, data fingerprint(s), software, time.

    ``config``: the command's typed settings (``evaluation/config.py``); saved whole with where each
    value came from, so ``--config RESULT.json`` runs the same command again.
    """
    fingerprints = {"data": data_fingerprint(data)}
    for name, path in (extra_data or {}).items():
        if path is not None:
            fingerprints[name] = data_fingerprint(path)
    return {
        "schema": SCHEMA,
        "command": command,
        "settings": {k: _plain(v) for k, v in settings.items()},
        **({"config": _config_dict(config), "config_sources": dict(config.sources)} if config is not None else {}),
        "checkpoints": [checkpoint_record(c) for c in ckpts],
        **fingerprints,
        "software": software(),
        "argv": sys.argv,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _config_dict(config: Any) -> dict:
    from lut_fast.config import to_dict

    return to_dict(config)


def attach_protocol(result_json: str | os.PathLike, record: dict) -> Path:
    """Add ``record`` as the ``protocol`` entry of a result JSON (rewritten atomically)."""
    from lut_fast.fileio import write_json_atomic

    path = Path(result_json)
    result = json.loads(path.read_text())
    result["protocol"] = {**record, "result": str(path.resolve())}
    return write_json_atomic(result, path, default=str)


def record_result(result_json: str | os.PathLike, command: str, ckpts: Iterable, config: Any,
                  extra_settings: dict | None = None, data_path: Any = None, **extra_data) -> Path:
    """For a command with typed settings: every setting (defaults included) and their sources, in the JSON.

    The data fingerprinted is ``data_path``, else the settings' ``data`` (None there = the built-in dataset).
    """
    from lut_fast.config import to_dict

    settings = {**to_dict(config), **(extra_settings or {})}
    data = data_path if data_path is not None else getattr(config, "data", None)
    return attach_protocol(result_json, protocol(command, list(ckpts), data, settings, extra_data, config=config))
