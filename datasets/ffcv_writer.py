"""ImageFolder -> FFCV ``.beton`` (fields ``image``: RGBImageField, ``label``: IntField).

The options are those of ffcv-imagenet's ``write_imagenet.py``: longest side
capped at ``max_resolution``, JPEG quality, write mode (``jpg``, ``raw``,
``proportion`` with ``compress_probability``, ``smart`` with
``smart_threshold``), workers and chunk size.

Two passes, because FFCV's writer cannot skip a sample: its worker processes
must return an image for every index, and a worker that raises leaves the
parent waiting forever. So a parallel check pass (a JPEG is decoded at 1/8
scale, which still parses all of its data) finds the bad files first, and
only good ones reach the writer. Should a file fail anyway (changed on disk
between the passes), the worker stores a placeholder, notes the path, and the
conversion is discarded with an error rather than kept with a gray image.
A worker that dies for any other reason (a full disk, the OOM killer) is
seen by a watchdog (``_watched_workers``), which stops the wait with a
one-line error instead of a hang.

``shorter_side=S`` (``--shorter-side``) shrinks every image once, here, so
its shorter side is S (bicubic, antialiased, the SRC recipe's resize; smaller
images are kept as they are), before FFCV's ``max_resolution`` cap and JPEG
encoding: LUT training at image size S then skips the resize entirely.

Labels follow torchvision's ImageFolder; the class list is written beside the
output as ``<name>.classes.json``, and how the images were stored (shorter
side, max resolution, quality, source folder, sample count) as
``<name>.meta.json`` (read back by ``pipelines.formats.stored_metadata``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from lut_fast.errors import UserError
from lut_fast.fileio import os_error_message

from . import sources

WRITE_MODES = ("jpg", "raw", "proportion", "smart")


def classes_path(beton: Path) -> Path:
    return beton.with_suffix(".classes.json")


def metadata_path(beton: Path) -> Path:
    return beton.with_suffix(".meta.json")


class _ImageDataset:
    """What FFCV's writer indexes: ``(RGB uint8 HWC array, label)``; never raises (see module doc)."""

    def __init__(self, samples: list[tuple[str, int]], failures: Path, shorter_side: int | None = None):
        self.samples, self.failures, self.shorter_side = samples, failures, shorter_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        try:
            return np.asarray(sources.open_rgb(path, shorter_side=self.shorter_side), dtype=np.uint8), label
        except Exception as e:  # noqa: BLE001
            with open(self.failures, "a") as f:  # O_APPEND: one short line per write is atomic
                f.write(f"{path}\t{type(e).__name__}: {e}\n")
            return np.full((8, 8, 3), 128, np.uint8), label


class _RichTqdm:
    """Stands in for the ``tqdm`` bar FFCV's writer draws, so conversion shows one style of progress."""

    def __init__(self, total: int, **_):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("[bold]ffcv write"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("eta"), TimeRemainingColumn())
        self._bar.__enter__()
        self._task = self._bar.add_task("write", total=total)

    def update(self, n: int = 1) -> None:
        self._bar.advance(self._task, n)

    def close(self) -> None:
        self._bar.__exit__(None, None, None)


@contextlib.contextmanager
def _rich_progress():
    import ffcv.writer

    saved = ffcv.writer.tqdm
    bars: list[_RichTqdm] = []

    def make_bar(*args, **kwargs) -> _RichTqdm:
        bars.append(_RichTqdm(*args, **kwargs))
        return bars[-1]

    ffcv.writer.tqdm = make_bar
    try:
        yield
    finally:
        ffcv.writer.tqdm = saved
        for bar in bars:  # an interrupted write never reaches FFCV's close(): stop the live display here
            bar.close()


class _WorkerDied(Exception):
    """Raised in the main thread, by the watchdog's signal, while FFCV's writer waits on a dead worker."""


class _WatchedProcess(multiprocessing.Process):
    """What ``ffcv.writer.Process`` is during a watched write: a worker that leaves its last error in a file."""

    error_file: Path | None = None  # set by _watched_workers for the processes it creates
    created: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_file = _WatchedProcess.error_file
        _WatchedProcess.created.append(self)

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:
            with open(self.error_file, "a") as f:
                f.write(f"{getattr(e, 'errno', None) or ''}\t{type(e).__name__}: {e}\n")
            raise


@contextlib.contextmanager
def _watched_workers(error_file: Path, out: Path):
    """Turn a dead FFCV writer process into a ``UserError`` instead of an endless wait.

    FFCV's parent process polls a shared counter until every sample is written
    and then blocks on a queue that each worker fills at its very end: a worker
    that dies on the way (ENOSPC while flushing a page, SIGKILL from the OOM
    killer) leaves it waiting forever. A thread here polls the workers' exit
    codes and, on a failure, sends SIGUSR1 to the main thread, whose handler
    raises out of FFCV's wait (a signal interrupts the blocking read, which a
    thread cannot). Signals reach only the main thread, so elsewhere the write
    runs unwatched, as FFCV's own.
    """
    import ffcv.writer

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = threading.Event()
    stop = threading.Event()

    def on_signal(signum, frame):
        if armed.is_set():
            armed.clear()
            raise _WorkerDied

    def watch() -> None:
        while not stop.wait(0.2):
            if any(p.exitcode not in (None, 0) for p in list(_WatchedProcess.created)) and armed.is_set():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                return

    saved_process, saved_handler = ffcv.writer.Process, signal.signal(signal.SIGUSR1, on_signal)
    _WatchedProcess.error_file, _WatchedProcess.created = error_file, []
    ffcv.writer.Process = _WatchedProcess
    watcher = threading.Thread(target=watch, name="ffcv-writer-watchdog", daemon=True)
    armed.set()
    watcher.start()
    try:
        yield
    except _WorkerDied:
        raise UserError(_worker_failure(error_file, out, _WatchedProcess.created)) from None
    finally:
        armed.clear()
        stop.set()
        watcher.join()
        ffcv.writer.Process = saved_process
        signal.signal(signal.SIGUSR1, saved_handler)
        for p in _WatchedProcess.created:  # the survivors would wait on a queue nobody reads
            if p.is_alive():
                p.terminate()
            p.join()


def _worker_failure(error_file: Path, out: Path, processes: list) -> str:
    """One line: what killed an FFCV writer process (its own error when it left one, else its exit code)."""
    lines = error_file.read_text().splitlines() if error_file.exists() else []
    if lines:
        code, _, message = lines[0].partition("\t")
        if code.isdigit():
            return os_error_message(OSError(int(code), os.strerror(int(code))), out)
        return f"an FFCV writer process failed: {message}; the output was discarded"
    codes = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
    how = f"was killed by signal {-codes[0]}" if codes and codes[0] < 0 else f"exited with code {codes[0] if codes else '?'}"
    hint = " (SIGKILL is usually the out-of-memory killer: try fewer --workers)" if codes and codes[0] == -9 else ""
    return f"an FFCV writer process {how}{hint}; the output was discarded"


def write_beton(
    src: str | Path,
    out: str | Path,
    split: str = "train",
    max_resolution: int | None = 512,
    jpeg_quality: int = 90,
    write_mode: str = "jpg",
    compress_probability: float = 0.5,
    smart_threshold: int | None = None,
    workers: int = 0,
    chunk_size: int = 100,
    overwrite: bool = False,
    shorter_side: int | None = None,
) -> sources.ConversionReport:
    """Convert one split of an ImageFolder tree to an FFCV ``.beton`` file at ``out``."""
    from lut_fast.pipelines import require_backend

    require_backend("ffcv")  # a one-line install hint instead of an ImportError
    out = Path(out).expanduser().absolute()
    if write_mode not in WRITE_MODES:
        raise UserError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise UserError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    sources.check_size_options(shorter_side, max_resolution)
    if max_resolution is not None and max_resolution > 65535:
        raise UserError("--max-resolution above 65535 is not storable in FFCV's image field")
    sources.check_output(out, overwrite)
    listing = sources.list_source(src, split)
    workers = sources.resolve_workers(workers)
    import torch

    threads = torch.get_num_threads()
    from ffcv.fields import IntField, RGBImageField  # slow (numba): before the clock starts
    from ffcv.writer import DatasetWriter

    torch.set_num_threads(threads)  # importing FFCV sets torch's process-wide thread count to 1

    t0 = time.perf_counter()

    paths = [p for p, _ in listing.samples]
    skipped = list(listing.skipped)
    good: list[tuple[str, int]] = []
    for (path, label), reason in zip(listing.samples, sources.parallel_map(sources.check_image, paths, workers, "check")):
        if reason is None:
            good.append((path, label))
        else:
            skipped.append((path, reason))
    if not good:
        raise UserError(f"no readable images in {listing.index.root}")
    if max_resolution is None:
        _check_sizes_fit(good, shorter_side)

    sources.make_parent(out)
    tmp = sources.temp_path(out)
    failures = tmp.with_name(tmp.name + ".failures")
    worker_errors = tmp.with_name(tmp.name + ".worker-errors")
    for path in (tmp, failures, worker_errors):
        sources.remove_path(path)
    try:
        if smart_threshold is None and write_mode == "smart":
            smart_threshold = 3 * ((max_resolution or 512) // 2) ** 2  # JPEG above (max side / 2)^2 pixels
        fields = {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, smart_threshold=smart_threshold,
                                   jpeg_quality=jpeg_quality, compress_probability=compress_probability),
            "label": IntField(),
        }
        writer = DatasetWriter(str(tmp), fields, num_workers=workers)
        try:
            with _rich_progress(), _watched_workers(worker_errors, out):
                writer.from_indexed_dataset(_ImageDataset(good, failures, shorter_side), chunksize=chunk_size)
        except UserError:
            _unlink_metadata(writer)
            raise
        except OSError as e:  # the parent's own writes (header, metadata, allocation table)
            _unlink_metadata(writer)
            raise UserError(os_error_message(e, out)) from None
        if failures.exists():
            lines = failures.read_text().splitlines()
            raise UserError(f"{len(lines)} file(s) became unreadable during writing (first: {lines[0]}); "
                            "the output was discarded: run the conversion again")
        classes_path(out).write_text(json.dumps(listing.index.class_to_idx, indent=1) + "\n")
        metadata = sources.storage_record("ffcv", listing, split, len(good), len(skipped), shorter_side,
                                          max_resolution, jpeg_quality, write_mode=write_mode,
                                          classes=len(listing.classes))
        sources.commit(tmp, out)
        sources.write_json_atomic(metadata_path(out), metadata)
    finally:
        for path in (tmp, failures, worker_errors):
            sources.remove_path(path)
    return sources.ConversionReport(out, len(good), listing.classes, out.stat().st_size,
                                    time.perf_counter() - t0, sorted(skipped))


def _unlink_metadata(writer) -> None:
    """FFCV keeps its sample table in shared memory (/dev/shm) and frees it only after a finished write."""
    sm = getattr(writer, "metadata_sm", None)
    if sm is not None:
        with contextlib.suppress(Exception):
            sm.close()
            sm.unlink()


def _check_sizes_fit(samples: list[tuple[str, int]], shorter_side: int | None) -> None:
    """FFCV stores width and height as uint16: say so before the writer fails obscurely."""
    from PIL import Image

    for path, _ in samples:
        with Image.open(path) as img:
            size = img.size
            if shorter_side and min(size) > shorter_side:
                size = sources.shorter_side_size(*size, shorter_side)
            if max(size) > 65535:
                raise UserError(f"{path} is {img.size[0]}x{img.size[1]}: pass --max-resolution (FFCV stores sizes as uint16)")
