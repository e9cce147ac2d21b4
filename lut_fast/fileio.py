"""Writing files without ever leaving a half-written one, and one-line errors when the disk says no.

Atomic writes: a temporary file in the same folder (``.<name>.<random>.tmp``),
flushed, then renamed over the target. A crash mid-write leaves the previous
file (checkpoint, report) untouched and never a half-written one under the
final name; a failed write (full disk, read-only folder) removes the
temporary file and raises a ``UserError`` naming the folder. Used by
checkpoints, exports, bench reports and evaluation results alike.

Appends (``metrics.jsonl``) cut a failed line back off, so the file holds only
whole lines; a line torn by a crash or a full disk anyway is dropped (and
reported) when the file is read back.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from lut_fast.errors import UserError

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def os_error_message(e: OSError, path: Path, action: str = "write") -> str:
    """One line for an OSError met while writing ``path`` (full disk, permissions, file/folder mix-ups)."""
    where = path.parent if e.errno in _NO_SPACE else path
    if e.errno in _NO_SPACE:
        return f"no space left on {where} (while writing {path.name}); free some space and run again"
    if e.errno in _NO_PERMISSION:
        return f"cannot {action} {path}: permission denied or read-only filesystem"
    if e.errno == errno.EISDIR:
        return f"cannot {action} {path}: it is a folder"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot {action} {path}: a file stands where a folder is needed ({e.filename or path})"
    return f"cannot {action} {path}: {e.strerror or e}"


def make_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``path`` (and parents) or raise a one-line ``UserError``; check that files can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} {path} is an existing file, not a folder: choose another path or move the file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Permission bits, read-only mounts and full disks show up here, before hours of training.
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError as e:  # a parent is a file
        raise UserError(f"cannot create the {what} {path}: {e.filename or 'a parent'} is a file, not a folder") from None
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise UserError(os_error_message(e, path / ".write-test")) from None
        raise UserError(os_error_message(e, path, action=f"write into the {what}")) from None
    return path


class _RecordingFile:
    """A file object that remembers the first OSError of a write.

    ``torch.save`` turns a failed write into ``RuntimeError: [enforce fail at
    inline_container.cc] ... file write failed``; the recorded error keeps the
    real cause (e.g. ENOSPC) for the message.
    """

    def __init__(self, f: IO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data):
        try:
            return _raw_write(self._f, data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _raw_write(f: IO, data) -> int:
    """The one place bytes reach a temporary file (tests make it fail like a full disk)."""
    return f.write(data)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder (give a file name inside it)")
    make_parent = not path.parent.is_dir()
    try:
        if make_parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileExistsError as e:
        raise UserError(f"cannot write {path}: {e.filename or path.parent} is a file, not a folder") from None
    except OSError as e:
        raise UserError(os_error_message(e, path)) from None
    recorder = None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            recorder = _RecordingFile(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users of a shared folder
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else e
        if isinstance(cause, OSError) and isinstance(e, (OSError, RuntimeError)):
            raise UserError(os_error_message(cause, path) + f"; {path.name} was left as it was") from None
        raise
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike, default: Callable[[Any], Any] | None = None) -> Path:
    def write(f: IO) -> None:
        json.dump(obj, f, indent=2, default=default)
        f.write("\n")

    return atomic_write(path, write)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line; on failure cut the file back to its old end (no half line) and raise a ``UserError``."""
    path = Path(path)
    with path.open("ab") as f:
        end = f.tell()
        try:
            _raw_write(f, (line.rstrip("\n") + "\n").encode())
            f.flush()
        except OSError as e:
            try:
                f.truncate(end)  # shrinking needs no space
            except OSError:
                pass
            raise UserError(os_error_message(e, path)) from None


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """The records of a JSON-lines file and the lines that did not parse (a torn last line after a crash or a full disk)."""
    records, bad = [], []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(line)
    return records, bad


# ---------------------------------------------------------------- stale temporary files


def temp_name_pattern(targets: str) -> re.Pattern:
    """The names ``atomic_write`` gives the temporary files of targets matching the regex ``targets``.

    mkstemp's names are ``.<target>.<8 chars of [a-z0-9_]>.tmp``; nothing else matches.
    """
    return re.compile(rf"^\.(?:{targets})\.[a-z0-9_]{{8}}\.tmp$")


def remove_stale_temp_files(folder: str | os.PathLike, pattern: re.Pattern) -> list[Path]:
    """Delete the temporary files a killed process left in ``folder`` (only names matching ``pattern``)."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        if pattern.match(entry.name) and (entry.is_symlink() or entry.is_file()):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # another process of the job got there first
                continue
            removed.append(Path(entry.path))
    return sorted(removed)
