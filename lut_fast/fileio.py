"""Atomic writes: a temporary file in the same folder, flushed, then renamed over the target.

A crash mid-write leaves the previous file (checkpoint, report) untouched and
never a half-written one under the final name. Used by checkpoints, bench
reports and evaluation results alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users of a shared folder
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike, default: Callable[[Any], Any] | None = None) -> Path:
    def write(f: IO) -> None:
        json.dump(obj, f, indent=2, default=default)
        f.write("\n")

    return atomic_write(path, write)
