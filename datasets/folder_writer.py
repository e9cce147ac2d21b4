"""ImageFolder -> ImageFolder of JPEGs stored at shorter side S: the torch backend's storage.

``lut-fast convert folder SRC_DIR OUT_DIR --shorter-side S`` writes one split
as a plain class-folder tree the torch backend (or any ImageFolder reader)
reads::

    OUT_DIR/<class>/<the source's path under its class folder>.jpg
    OUT_DIR/lut-fast-folder.json   how the images were stored (read by pipelines.formats.stored_metadata)

As the DALI converter's OUT_DIR, OUT_DIR holds one split: name it
``ROOT/train`` (and ``ROOT/val`` with ``--split val``) to pass ``--data ROOT``.
Every class folder of the source is created, even one whose files were all
skipped, so the class indices stay torchvision ImageFolder's of the source.

Every image whose shorter side exceeds S is shrunk once, here, by the rule the
other converters use (``sources.open_rgb``: bicubic, antialiased, the SRC
recipe's resize, then the optional ``max_resolution`` cap) and encoded at
``jpeg_quality``; RGB JPEGs needing no resize are copied byte for byte; other
images (PNG, CMYK, gray ...) are converted to RGB JPEGs. A source file named
``x.jpg`` / ``x.jpeg`` keeps its name; any other gets ``.jpg`` appended
(``x.png`` -> ``x.png.jpg``), so two sources never land on one name.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lut_fast.errors import UserError

from . import sources

FORMAT_TAG = "imagefolder"
METADATA = "lut-fast-folder.json"


@dataclass(frozen=True)
class _Job:
    path: str
    dest: str  # where the stored JPEG goes (inside the temporary output folder)
    max_resolution: int | None
    quality: int
    shorter_side: int


def store_one(job: _Job) -> tuple[int, str | None]:
    """(bytes written, None) for a good image, (0, reason) for a bad one. Runs in a worker process
    (which writes the file itself: only a short result travels back)."""
    data, reason = sources.stored_jpeg(job.path, job.max_resolution, job.quality, job.shorter_side)
    if data is None:
        return 0, reason
    Path(job.dest).write_bytes(data)
    return len(data), None


def stored_name(relative: Path) -> Path:
    """The stored file's path under its class folder: the source's, with ``.jpg`` appended unless it is a JPEG name."""
    if relative.suffix.lower() in (".jpg", ".jpeg"):
        return relative
    return relative.with_name(relative.name + ".jpg")


def read_metadata(folder: Path) -> dict | None:
    """The metadata ``convert folder`` left in ``folder`` (one split), or None when there is none."""
    path = folder / METADATA
    meta = sources.read_json_record(path, missing_ok=True)
    if meta is not None and meta.get("format") != FORMAT_TAG:
        raise UserError(f"{path} is not a lut-fast folder record (format {meta.get('format')!r})")
    return meta


def write_folder(
    src: str | Path,
    out_dir: str | Path,
    shorter_side: int,
    split: str = "train",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    workers: int = 0,
    overwrite: bool = False,
) -> sources.ConversionReport:
    """Store one split of an ImageFolder tree at ``out_dir`` with every image's shorter side at most ``shorter_side``."""
    out = Path(out_dir).expanduser().absolute()
    if shorter_side is None:
        raise UserError("--shorter-side is required: the size the images are stored at (e.g. the training image size)")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    sources.check_size_options(shorter_side, max_resolution)
    sources.check_output(out, overwrite)
    listing = sources.list_source(src, split)
    root = listing.index.root
    if out == root.absolute() or root.absolute() in out.parents:
        raise UserError(f"the output {out} is inside the source {root}: write it elsewhere")
    workers = sources.resolve_workers(workers)
    t0 = time.perf_counter()

    sources.make_parent(out)
    tmp = sources.temp_path(out)
    sources.remove_path(tmp)
    tmp.mkdir()
    try:
        jobs: list[_Job] = []
        used: set[Path] = set()
        for path, label in listing.samples:
            cls = listing.classes[label]
            rel = Path(cls) / stored_name(Path(os.path.relpath(path, root / cls)))
            if rel in used:  # "x.png.jpg" beside "x.png": keep both
                stem, n = rel.with_suffix(""), 1
                while rel in used:
                    rel, n = Path(f"{stem}-{n}.jpg"), n + 1
            used.add(rel)
            jobs.append(_Job(path, str(tmp / rel), max_resolution, jpeg_quality, shorter_side))
        for cls in listing.classes:
            (tmp / cls).mkdir()
        for folder in sorted({Path(j.dest).parent for j in jobs}):
            folder.mkdir(parents=True, exist_ok=True)
        skipped = list(listing.skipped)
        written = 0
        for job, (_, reason) in zip(jobs, sources.parallel_map(store_one, jobs, workers, "store")):
            if reason is not None:
                skipped.append((job.path, reason))
            else:
                written += 1
        if written == 0:
            raise UserError(f"no readable images in {root}")
        record = sources.storage_record(FORMAT_TAG, listing, split, written, len(skipped), shorter_side,
                                        max_resolution, jpeg_quality, classes=len(listing.classes))
        (tmp / METADATA).write_text(json.dumps(record, indent=1) + "\n")
        sources.commit(tmp, out)
    finally:
        sources.remove_path(tmp)
    return sources.ConversionReport(out, written, listing.classes, sources.path_size(out),
                                    time.perf_counter() - t0, sorted(skipped))
