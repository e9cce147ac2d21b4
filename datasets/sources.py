"""What the converters share: listing a source folder, checking and storing images, metadata, atomic outputs.

A conversion reads an ImageFolder tree (the class mapping comes from
``imagefolder.scan_image_folder``, so it is torchvision's), checks every file
in parallel, writes the good ones and reports the rest. Three rules hold for
every output format:

* unreadable, empty and non-image files are skipped and listed, never fatal;
* PNG, CMYK, grayscale, palette and alpha images are converted to RGB;
* the output appears under its final name only when it is complete: it is
  written under a temporary name beside it and renamed at the end, and an
  existing output is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image

from lut_fast.errors import UserError

from .imagefolder import ImageFolderIndex, scan_image_folder

# Decoding at 1/8 scale (JPEG DCT scaling) still parses every entropy-coded
# block, so truncated or corrupt files fail, at a fraction of a full decode.
_CHECK_DRAFT = (64, 64)


@dataclass
class SourceList:
    """The files of one split: images to convert, and what was skipped at listing time."""

    index: ImageFolderIndex
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def samples(self) -> list[tuple[str, int]]:
        return self.index.samples


def list_source(src: str | os.PathLike, split: str = "train") -> SourceList:
    """Scan ``src`` (a split root or a class-folder tree) the way torchvision's ImageFolder does.

    Files torchvision would ignore (no image extension) and zero-byte files
    are listed as skipped, so the report accounts for every file.
    """
    index = scan_image_folder(src, split)
    skipped = [(p, "empty file (0 bytes)") for p in index.skipped_empty]
    skipped += [(p, "not an image file (extension)") for p in index.skipped_other]
    return SourceList(index=index, skipped=sorted(skipped))


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side at ``size``, the longer rounded (half up) and never below it.

    The rule every backend's SRC resize uses, so images stored this way need no resize at training time.
    """
    if width <= height:
        return size, max(size, int(height * size / width + 0.5))
    return max(size, int(width * size / height + 0.5)), size


def open_rgb(path: str, max_resolution: int | None = None, shorter_side: int | None = None) -> Image.Image:
    """Decode fully as RGB (CMYK, L, P, RGBA, I;16 ... converted).

    ``shorter_side``: shrink (never enlarge) so the shorter side is that many pixels, bicubic with
    antialiasing (PIL's filter widens with the scale), as the SRC recipe's resize does. Then
    ``max_resolution`` caps the longer side.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            else:
                img = img.copy()
    if shorter_side and min(img.size) > shorter_side:
        img = img.resize(shorter_side_size(img.width, img.height, shorter_side), Image.BICUBIC)
    if max_resolution and max(img.size) > max_resolution:
        scale = max_resolution / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
    return img


def check_image(path: str) -> str | None:
    """None if ``path`` decodes as an image, else a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", _CHECK_DRAFT)
                img.load()
                if img.width < 1 or img.height < 1:
                    return "image has no pixels"
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no detail'})"


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def stored_jpeg(path: str, max_resolution: int | None, quality: int,
                shorter_side: int | None = None) -> tuple[bytes | None, str | None]:
    """What a JPEG-storing converter keeps of one source file: (JPEG bytes, None), or (None, reason) for a bad one.

    An RGB JPEG that needs no resize is kept byte for byte (no second lossy
    encode); anything else (PNG, CMYK or grayscale JPEG, an image above
    ``shorter_side`` or ``max_resolution``) is decoded by ``open_rgb``, resized
    by its rule and encoded once at ``quality``. Runs in a worker process.
    """
    reason = check_image(path)
    if reason is not None:
        return None, reason
    try:
        with Image.open(path) as img:
            passthrough = img.format == "JPEG" and img.mode == "RGB" and not (
                max_resolution and max(img.size) > max_resolution
            ) and not (shorter_side and min(img.size) > shorter_side)
        if passthrough:
            return Path(path).read_bytes(), None
        return encode_jpeg(open_rgb(path, max_resolution, shorter_side), quality), None
    except Exception as e:  # noqa: BLE001 - anything here means the file is unusable
        return None, f"unreadable ({type(e).__name__}: {e})"


def storage_record(fmt: str, listing: SourceList, split: str, num_samples: int, skipped: int,
                   shorter_side: int | None, max_resolution: int | None, quality: int, **extra) -> dict:
    """The metadata every converter records about its output (``pipelines.formats.stored_metadata`` reads it).

    ``shorter_side`` / ``max_resolution``: how the images were shrunk (None: kept); ``source``: the folder
    converted (``bench data`` measures its decode floor too).
    """
    return {"format": fmt, "version": 1, "split": split, "source": str(listing.index.root),
            "num_samples": num_samples, "skipped": skipped, "shorter_side": shorter_side,
            "max_resolution": max_resolution, "quality": quality, **extra}


def parallel_map(fn: Callable, items: Sequence, workers: int, description: str, chunksize: int = 16) -> Iterator:
    """``fn`` over ``items`` in ``workers`` processes, results in order, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=len(items))
        if workers <= 1:
            for item in items:
                result = fn(item)
                bar.advance(task)  # before yielding: a consumer may stop after the last item
                yield result
            return
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for result in pool.imap(fn, items, chunksize=chunksize):
                bar.advance(task)
                yield result


def resolve_workers(workers: int) -> int:
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    return workers or (os.cpu_count() or 1)


# ---------------------------------------------------------------- atomic outputs


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to touch an existing output unless asked, before any work is done."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: pass --overwrite to replace it")
    for parent in out.parents:  # the nearest existing ancestor must be a folder (missing ones are created later)
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {out}: {parent} is a file, not a folder")
            break


def make_parent(out: Path) -> None:
    """Create the output's missing parent folders (``convert dali photos out/new/train`` works like mkdir -p)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out.parent}: {e.strerror or e}") from None


def check_size_options(shorter_side: int | None, max_resolution: int | None) -> None:
    if shorter_side is not None and shorter_side < 1:
        raise UserError(f"--shorter-side must be positive, got {shorter_side}")
    if max_resolution is not None and max_resolution < 1:
        raise UserError(f"--max-resolution must be positive, got {max_resolution}")
    if shorter_side and max_resolution and max_resolution < shorter_side:
        raise UserError(f"--max-resolution {max_resolution} is below --shorter-side {shorter_side}: "
                        "every image would end up with its shorter side below the training size")


def read_json_record(path: Path, missing_ok: bool = False) -> dict | None:
    """A JSON record a converter wrote (metadata, manifest): the dict, or None when it is absent and
    ``missing_ok``; a UserError, in one line, when it cannot be read or is not a JSON object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if missing_ok and isinstance(e, FileNotFoundError):
            return None
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return record


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``path`` whole or not at all (temporary file beside it, then rename)."""
    import json

    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def temp_path(out: Path) -> Path:
    """A name beside ``out`` (same file system, so the final rename is atomic)."""
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(tmp: Path, out: Path) -> None:
    """Move the finished output into place, replacing an old one (``--overwrite`` was checked)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        remove_path(old)
    else:
        os.replace(tmp, out)


@dataclass
class ConversionReport:
    """What a converter did: printed as the final summary and returned to callers (tests)."""

    output: Path
    images: int
    classes: list[str]
    bytes: int
    seconds: float
    skipped: list[tuple[str, str]]

    def print(self, console=None, show: int = 20) -> None:
        from rich.console import Console

        c = console or Console(stderr=True)
        if self.skipped:
            c.print(f"[yellow]skipped {len(self.skipped)} file(s):[/]")
            for path, reason in self.skipped[:show]:
                c.print(f"  {path}: {reason}", markup=False, highlight=False, soft_wrap=True)
            if len(self.skipped) > show:
                c.print(f"  ... and {len(self.skipped) - show} more")
        rate = self.images / max(self.seconds, 1e-9)
        c.print(
            f"wrote [bold]{self.output}[/]: {self.images} images, {len(self.classes)} classes, "
            f"{_human_bytes(self.bytes)}, {self.seconds:.1f} s ({rate:.0f} images/s), {len(self.skipped)} skipped",
            soft_wrap=True,
        )


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def path_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
