"""ImageFolder -> tar shards in webdataset layout, with the index files DALI's reader uses.

Why tar shards: on network file systems one large sequential read beats
thousands of small random ones, and DALI's ``readers.webdataset`` reads them
with per-rank sharding. Layout of OUT_DIR::

    shard-000000.tar   members 00000000.jpg, 00000000.cls, 00000000.label, 00000001.jpg, ...
    shard-000000.idx   DALI/wds2idx index, version v1.2 (written while the tar is written)
    classes.json       {"class name": index} -- torchvision ImageFolder's mapping
    manifest.json      format tag, sample count, classes, shard list (read by the loader)

Each sample has three members: ``.jpg`` (RGB JPEG), ``.cls`` (the label as
ASCII digits: the webdataset convention, for other tools) and ``.label``
(the label as a little-endian int64, which DALI reads directly as a tensor).
Samples are stored in a seeded random order, because DALI's reader shuffles
only within a buffer: a class-sorted tar would give class-sorted batches and
per-rank shards holding a few classes each.

RGB JPEGs are stored byte for byte (no second lossy encode) unless they are
resized; everything else (PNG, CMYK or grayscale JPEG, ...) is converted to
RGB and encoded once. ``shorter_side=S`` (``--shorter-side``) shrinks every
image larger than that once, here (bicubic, antialiased: the SRC recipe's
resize), so LUT training at image size S decodes small files and skips the
resize. The manifest records how the images were stored (``shorter_side``,
``max_resolution``, ``quality``, ``source``, ``num_samples``).
"""

from __future__ import annotations

import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lut_fast.errors import UserError
from lut_fast.fileio import os_error_message

from . import sources

FORMAT_TAG = "lut-fast-webdataset"
MANIFEST = "manifest.json"
CLASSES = "classes.json"
IMAGE_EXT = "jpg"
LABEL_EXT = "label"  # int64 little-endian
CLS_EXT = "cls"  # ASCII, webdataset convention
INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class _Job:
    path: str
    label: int
    max_resolution: int | None
    quality: int
    shorter_side: int | None = None


def prepare_sample(job: _Job) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None) for a good image, (None, reason) for a bad one. Runs in a worker process."""
    return sources.stored_jpeg(job.path, job.max_resolution, job.quality, job.shorter_side)


class _ShardWriter:
    """Writes numbered tar shards and, alongside each, its index (offsets known while writing)."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._lines: list[str] = []

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}"
        self._tar = tarfile.open(self.folder / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"tar": f"{name}.tar", "index": f"{name}.idx", "samples": 0})
        self._lines = []

    def _member(self, name: str, data: bytes) -> str:
        import io

        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        header = info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
        offset = self._tar.offset + len(header)
        self._tar.addfile(info, io.BytesIO(data))
        return f"{name.split('.', 1)[1]} {offset} {len(data)} {name}"

    def add(self, key: str, image: bytes, label: int) -> None:
        if self._tar is None:
            self._open()
        parts = [
            self._member(f"{key}.{IMAGE_EXT}", image),
            self._member(f"{key}.{CLS_EXT}", str(label).encode()),
            self._member(f"{key}.{LABEL_EXT}", np.int64(label).astype("<i8").tobytes()),
        ]
        self._lines.append(" ".join(parts))
        self.shards[-1]["samples"] += 1
        if self.shards[-1]["samples"] >= self.shard_size:
            self.close_shard()

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        index = self.folder / self.shards[-1]["index"]
        index.write_text(f"{INDEX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines))
        self._tar = None


def write_shards(
    src: str | Path,
    out_dir: str | Path,
    split: str = "train",
    shard_size: int = 1000,
    max_resolution: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    shorter_side: int | None = None,
) -> sources.ConversionReport:
    """Convert one split of an ImageFolder tree to DALI-readable webdataset shards in ``out_dir``."""
    out = Path(out_dir).expanduser().absolute()
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    sources.check_size_options(shorter_side, max_resolution)
    sources.check_output(out, overwrite)
    listing = sources.list_source(src, split)
    workers = sources.resolve_workers(workers)
    t0 = time.perf_counter()

    order = np.random.default_rng(seed).permutation(len(listing.samples))
    jobs = [_Job(*listing.samples[i], max_resolution, jpeg_quality, shorter_side) for i in order]
    skipped = list(listing.skipped)
    sources.make_parent(out)
    tmp = sources.temp_path(out)
    sources.remove_path(tmp)
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, shard_size)
        written = 0
        for job, (data, reason) in zip(jobs, sources.parallel_map(prepare_sample, jobs, workers, "dali shards")):
            if data is None:
                skipped.append((job.path, reason))
                continue
            writer.add(f"{written:08d}", data, job.label)
            written += 1
        writer.close_shard()
        if written == 0:
            raise UserError(f"no readable images in {listing.index.root}")
        class_to_idx = listing.index.class_to_idx
        (tmp / CLASSES).write_text(json.dumps(class_to_idx, indent=1) + "\n")
        manifest = sources.storage_record(
            FORMAT_TAG, listing, split, written, len(skipped), shorter_side, max_resolution, jpeg_quality,
            classes=listing.classes, image_ext=IMAGE_EXT, label_ext=LABEL_EXT, shards=writer.shards, seed=seed,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        sources.commit(tmp, out)
    except OSError as e:  # reading is the workers' (a bad file is skipped): this is a write, e.g. a full disk
        raise UserError(os_error_message(e, out)) from None
    finally:
        sources.remove_path(tmp)
    return sources.ConversionReport(out, written, listing.classes, sources.path_size(out),
                                    time.perf_counter() - t0, sorted(skipped))


def read_manifest(folder: Path) -> dict:
    """The manifest of a shard folder, checked; a UserError says what is wrong."""
    path = folder / MANIFEST
    manifest = sources.read_json_record(path)
    if manifest.get("format") != FORMAT_TAG:
        raise UserError(f"{path} is not a lut-fast shard manifest (format {manifest.get('format')!r})")
    for shard in manifest["shards"]:
        for key in ("tar", "index"):
            if not (folder / shard[key]).is_file():
                raise UserError(f"{folder / shard[key]} is missing: re-run `lut-fast convert dali`")
    return manifest
