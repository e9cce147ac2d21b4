"""Timing several things window by window in one process: floor, A, B, ..., floor, A, B, ...

On a shared machine the load changes from minute to minute; measuring A for
a minute and then B for a minute compares two different machines. Here every
subject gets one window per round, rounds repeat, and each subject's figure is
the median of its windows, so a busy spell hits all subjects alike.

Two things must stay out of a timed window:

* **Other subjects' background work.** A loader keeps producing into its
  prefetch queue after its window ends. A loader whose workers are processes
  (the torch DataLoader) is frozen between its windows (SIGSTOP / SIGCONT on
  exactly the worker processes it started), so its stream resumes where it
  stopped. A loader whose work runs on threads of this process (DALI, FFCV)
  cannot be frozen: it is let fill its queue (``quiesce`` waits until the whole
  process tree is idle before any window), and the batches it made ahead are
  read, untimed, before its own window starts (``drain``).
* **Start-up and epoch boundaries.** Each loader's iterator lives across
  windows; a window is timed only if the current epoch still holds the drain
  plus a whole window, otherwise the epoch is finished untimed and the next is
  started first. The time from starting an epoch to its first batch (DALI
  rebuilds its pipeline, the DataLoader refills its workers) is reported on its
  own (``startup_s`` for the first epoch, ``epoch_start_s`` for later ones).

One thing must be inside it: **all the work of the batches it counts.** A
thread-backed loader is still building batches when its window's last one
arrives; charging that unfinished work to the window (as its CPU clock would)
adds up to a batch per thread to a window of a few batches, and work the drain
before the window waited for was never charged at all (torch's threads read
10-15 % dearer than they are, FFCV a quarter cheaper). So for such a loader the
CPU clock runs from one idle moment to the next: from ``quiesce`` before the
drain (the loader's queue full, nothing in flight) to ``quiesce`` after the
window (the queue refilled, nothing in flight). In between it built exactly as
many batches as were read, drained and timed, and its CPU seconds are divided
by those. The wall clock still times the window alone. Each epoch's first
batches are read untimed too (``StreamSubject.warm_up``): buffers a loader
allocates per epoch are faulted in by their first use.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from lut_fast.bench.measure import CpuClock, cpu_seconds_tree
from lut_fast.errors import UserError


def child_pids(parent: int | None = None) -> set[int]:
    """Live direct children of ``parent`` (default: this process), from /proc."""
    parent = os.getpid() if parent is None else parent
    out = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2 :].split()[1]) == parent:
            out.add(int(name))
    return out


def quiesce(max_s: float = 3.0, sample_s: float = 0.1, busy_cores: float = 0.3) -> bool:
    """Wait until this process tree uses less than ``busy_cores`` cores over ``sample_s``; False on timeout."""
    deadline = time.perf_counter() + max_s
    while True:
        c0, t0 = cpu_seconds_tree(), time.perf_counter()
        time.sleep(sample_s)
        if (cpu_seconds_tree() - c0) / (time.perf_counter() - t0) < busy_cores:
            return True
        if time.perf_counter() > deadline:
            return False


class Subject:
    """One thing to time. Subclasses: ``FloorSubject`` (decode only), ``StreamSubject`` (a loader)."""

    key: str = ""
    pausable: bool = False
    works_ahead: bool = False  # keeps building batches after its window (a loader on threads): see the module doc

    def start(self) -> None:
        """Untimed set-up (build, first batch)."""

    def before_window(self, window_batches: int) -> None:
        """Untimed: whatever must happen before a window (a new epoch)."""

    def drain(self) -> int:
        """Untimed: read what was made ahead while other subjects were timed; returns the number of images."""
        return 0

    def window(self, window_batches: int) -> int:
        """The timed work; returns the number of images."""
        raise NotImplementedError

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        pass


class FloorSubject(Subject):
    """Decode only: ``images`` blobs (in memory) per window on a thread pool."""

    def __init__(self, key: str, blobs: list[bytes], decode: Callable[[bytes], object], threads: int, images: int):
        from concurrent.futures import ThreadPoolExecutor

        self.key, self.blobs, self.decode, self.images = key, blobs, decode, images
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads)
        self.next_index = 0

    def start(self) -> None:
        list(self.pool.map(self.decode, self.blobs[: max(2 * self.threads, 8)]))  # warm-up; errors surface here

    def window(self, window_batches: int) -> int:
        chunk = [self.blobs[(self.next_index + i) % len(self.blobs)] for i in range(self.images)]
        self.next_index = (self.next_index + self.images) % len(self.blobs)
        list(self.pool.map(self.decode, chunk, chunksize=max(1, len(chunk) // (4 * self.threads))))
        return len(chunk)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class StreamSubject(Subject):
    """A loader's batches across epochs (see the module doc).

    ``build()`` makes the loader; ``batches(loader)`` gives one epoch's
    iterable (``loader.raw_batches()`` or the loader itself); ``count(batch)``
    its number of images; ``ready_depth`` how many batches the loader may have
    made ahead (drained before a window when its work cannot be paused), or
    ``depth_of(loader)`` reads it off the built loader.
    """

    def __init__(self, key: str, build: Callable[[], object], batches: Callable[[object], Iterator],
                 count: Callable[[object], int], ready_depth: int = 0,
                 depth_of: Callable[[object], int] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.key, self.build, self.batches, self.count = key, build, batches, count
        self.ready_depth, self.depth_of, self.clock = ready_depth, depth_of, clock
        self.loader = None
        self.epoch, self.pos, self.batches_per_epoch = -1, 0, 0
        self.startup_s: float | None = None
        self.epoch_start_s: list[float] = []  # later epochs: from starting one to its first batch
        self.workers: set[int] = set()  # worker processes this loader started (frozen between its windows)
        self.last_batch = None
        self._it: Iterator | None = None

    @property
    def pausable(self) -> bool:
        return bool(self.workers)

    @property
    def works_ahead(self) -> bool:
        return not self.pausable

    def start(self) -> None:
        before = child_pids()
        t0 = self.clock()
        self.loader = self.build()
        self.batches_per_epoch = len(self.loader)
        if self.depth_of is not None:
            self.ready_depth = self.depth_of(self.loader)
        self._next_epoch()
        self.startup_s = self.clock() - t0
        self.workers = child_pids() - before  # the worker processes this loader started (none: threads)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.loader.set_epoch(self.epoch)
        self._it = iter(self.batches(self.loader))
        self.pos = 0
        self._next()  # the first batch: start-up / epoch-boundary cost, never in a window

    def _next(self):
        self.last_batch = next(self._it)
        self.pos += 1
        return self.last_batch

    def needed(self, window_batches: int) -> int:
        """Batches the epoch must still hold: those drained before the window, the window's, and (thread
        loaders) those it makes ahead again before it is idle, so that its CPU clock stops in the same epoch."""
        return (0 if self.pausable else 2 * self.ready_depth) + window_batches

    @property
    def warm_up(self) -> int:
        """Batches read untimed at the start of each epoch before anything is counted: a thread loader's
        buffers may be new each epoch (FFCV allocates them per epoch), and their first use faults them in,
        a cost of the epoch's start that a real epoch of thousands of batches never notices."""
        return self.ready_depth if self.works_ahead else 0

    def before_window(self, window_batches: int) -> None:
        need = self.needed(window_batches)
        if need + 1 + self.warm_up > self.batches_per_epoch:
            raise UserError(f"{self.key}: an epoch has {self.batches_per_epoch} batches, fewer than the "
                            f"{need + 1 + self.warm_up} a window needs (first batch, {self.warm_up} to warm up, "
                            f"{need - window_batches} made ahead before and after, {window_batches} timed): "
                            "use more images (--data photos:N) or fewer --window-batches")
        if self.batches_per_epoch - self.pos < need:
            for _ in self._it:  # finish the epoch untimed: its end is the loader's own business
                pass
            t0 = self.clock()
            self._next_epoch()
            self.epoch_start_s.append(self.clock() - t0)
        while self.pos <= self.warm_up:
            self._next()

    def drain(self) -> int:
        if self.pausable:
            return 0
        return sum(self.count(self._next()) for _ in range(self.ready_depth))

    def window(self, window_batches: int) -> int:
        return sum(self.count(self._next()) for _ in range(window_batches))

    def _signal(self, sig) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                self.workers.discard(pid)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self.resume()  # a stopped worker would never see its shutdown request
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = self.loader = None  # last_batch stays: the report reads its shape and dtype


@dataclass
class Windows:
    """Per subject: (images, wall seconds, CPU seconds) of each timed window, and why it stopped, if it did."""

    samples: dict[str, list[tuple[int, float, float]]]
    errors: dict[str, BaseException]
    quiesce_timeouts: dict[str, int]
    order: list[str]  # the keys in the order their windows were timed


def run_interleaved(subjects: list[Subject], windows: int, window_batches: int, warmup_rounds: int = 1,
                    clock_factory: Callable[[], CpuClock] = CpuClock, settle: Callable[[], bool] = quiesce,
                    sync: Callable[[], None] = lambda: None, progress: Callable[[str], None] | None = None,
                    cpu_seconds: Callable[[], float] = cpu_seconds_tree) -> Windows:
    """Start every subject, then ``warmup_rounds`` untimed and ``windows`` timed rounds of one window each.

    Each sample is (images, wall seconds, CPU seconds) of the window; for a subject that works ahead the
    CPU seconds are its settle-to-settle CPU per image (module doc) times the window's images."""
    out = Windows({s.key: [] for s in subjects}, {}, {s.key: 0 for s in subjects}, [])
    live: list[Subject] = []
    try:
        for s in subjects:
            try:
                s.start()
                s.pause()
                live.append(s)
            except Exception as e:  # noqa: BLE001 - one subject failing must not stop the others
                out.errors[s.key] = e
                s.resume()
        for rnd in range(warmup_rounds + windows):
            timed = rnd >= warmup_rounds
            if progress is not None:
                progress(f"round {rnd + 1}/{warmup_rounds + windows}{'' if timed else ' (warm-up)'}")
            for s in live:
                if s.key in out.errors:
                    continue
                try:
                    if s.pausable:
                        quiet = settle()
                        s.resume()
                        s.before_window(window_batches)
                    else:
                        s.before_window(window_batches)
                        quiet = settle()
                    idle_cpu = cpu_seconds()  # idle: nothing in flight (read only for subjects that work ahead)
                    drained = 0 if s.pausable else s.drain()
                    clock = clock_factory().start()
                    n = s.window(window_batches)
                    sync()
                    wall, cpu = clock.stop()
                    if getattr(s, "works_ahead", False):  # every batch it started is finished and counted (module doc)
                        quiet = settle() and quiet
                        cpu = (cpu_seconds() - idle_cpu) * n / (n + drained)
                    s.pause()
                except Exception as e:  # noqa: BLE001
                    out.errors[s.key] = e
                    s.resume()
                    continue
                if timed:
                    out.samples[s.key].append((n, wall, cpu))
                    out.order.append(s.key)
                    out.quiesce_timeouts[s.key] += 0 if quiet else 1
    finally:
        for s in subjects:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing is best effort; the figures are already taken
                pass
        # Free the closed loaders' native pipelines (DALI's, FFCV's threads) now, while the interpreter is
        # whole: torn down during its exit instead, they intermittently aborted the process (exit 134).
        import gc

        gc.collect()
    return out
