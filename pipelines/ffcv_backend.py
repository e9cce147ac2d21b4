"""The FFCV backend: a ``.beton`` file -> ``Batch``, the views built by numba operations.

LUT: one JPEG decode and one shorter-side resize per image, shared by both
views (``ffcv_ops.SrcViewsDecoder``). Where view 2's photometric ops run
(``photometric_on``):

* ``loader`` (the CPU default): view 1 is a zero-copy view of the decoder's
  output, view 2 runs ``StrongView`` (numba, FFCV's threads) into its own buffer;
  on a CPU-only run both are normalised to float32 as they are copied out of
  FFCV's buffers (``ffcv_ops.normalize_views``), the copy any batch needs;
* ``device`` (the CUDA default): the decoder's two uint8 crops are handed
  over as they are, with view 2's parameters drawn per batch in this process
  (``strong_params.py``); ``finish_batch`` applies the ops batched on the
  device, where they cost microseconds instead of CPU milliseconds.

MAE: ``RrcFlipDecoder`` (torchvision's RandomResizedCrop box rule,
``spec.rrc_*``, and the flip). ``raw_batches()`` yields the uint8 views
(``RawBatch``); iterating yields ``finish_batch`` of each, which copies
uint8 to the device (a quarter of float32's bytes) and normalises there.

Options (``build_loader(..., order=, os_cache=, batches_ahead=)``):
``order`` random (default), quasi_random (reads page by page: for data
larger than RAM, with ``os_cache=False``; not with several processes) or
sequential; ``os_cache`` True maps the file through the OS page cache
(shared between processes on a node), False makes FFCV read it itself.

Contract details: last-batch policy DROP (``drop_last=True``); with
``world_size > 1`` FFCV's ``distributed=True`` mode uses the process group
(a DistributedSampler per epoch); ``set_epoch(e, start_batch)`` selects
FFCV's epoch ``e`` order and starts at ``start_batch`` without decoding the
skipped batches. FFCV reuses its batch buffers, so everything handed out is
a tensor of its own (``raw_batches`` copies the views, normalising them on a
CPU-only run, into buffers reused once the consumer has let go of them,
``_CopyBuffers``; when iterating towards a GPU, ``finish_batch``'s conversion
to float allocates them; labels are cloned).

Threads: FFCV's ``num_workers`` are numba threads (at most the core count).
FFCV also sets torch's process-wide thread count on every epoch, which
would starve (or oversubscribe) the trainer's own CPU work; ``_keep_torch_threads``
makes it set only numba's.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Iterator

import numba
import numpy as np
import torch

from lut_fast.errors import UserError

from . import formats, malloc
from .batch import Batch, RawBatch, finish_batch, resolve_photometric_on
from .contract import LoaderOptions, check_aug_support
from .ffcv_ops import (  # first: keeps torch's thread count
    RrcFlipDecoder,
    SrcViewsDecoder,
    StrongView,
    TakeView,
    normalization_table,
    normalize_views,
)
from .strong_params import strong_params_for_batch
from .torch_backend import _storage_use_count

from ffcv.fields.basics import IntDecoder  # noqa: E402, I001
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.loader.epoch_iterator import EpochIterator  # noqa: E402
from ffcv.pipeline import PipelineSpec  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.transforms import ToDevice, ToTensor  # noqa: E402

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM, "sequential": OrderOption.SEQUENTIAL}


def _keep_torch_threads() -> None:
    """Make FFCV's Compiler.set_num_threads set numba's (thread-local) count only, not torch's."""

    def set_num_threads(cls, n: int) -> None:
        n = n if n >= 1 else (os.cpu_count() or 1)
        cls.num_threads = n
        numba.set_num_threads(n)

    Compiler.set_num_threads = classmethod(set_num_threads)


_keep_torch_threads()


def resolve_beton(data: str | Path, split: str) -> Path:
    source = formats.detect(data, split)
    if source.kind == "beton":
        formats.check_beton(source.path)
        return source.path
    if source.kind == "shards":
        raise UserError(f"{source.path} holds DALI shards; FFCV reads .beton files: use --backend dali, "
                        "or convert the image folder with `lut-fast convert ffcv SRC_DIR OUT.beton`")
    raise UserError(f"FFCV reads .beton files, and {source.path} is an image folder: convert it first with "
                    f"`lut-fast convert ffcv {source.path} OUT.beton --split {split}` and pass --data OUT.beton")


class _WatchedQueue(queue.Queue):
    """FFCV's output queue, watched: if its producer thread has died, ``get`` raises instead of waiting forever."""

    def __init__(self, maxsize: int, producer: "WatchedEpochIterator"):
        super().__init__(maxsize)
        self.producer = producer

    def get(self, block: bool = True, timeout: float | None = None):
        if not block or timeout is not None:
            return super().get(block, timeout)
        while True:
            try:
                return super().get(timeout=0.5)
            except queue.Empty:
                if self.producer.is_alive():
                    continue
                try:
                    return super().get_nowait()  # anything it put before it ended
                except queue.Empty:
                    error = self.producer.error
                    raise RuntimeError(f"FFCV's loader thread failed: {type(error).__name__}: {error}") from error


class WatchedEpochIterator(EpochIterator):
    """FFCV's ``EpochIterator`` whose failures reach the training loop.

    FFCV's thread catches only the end of the epoch: any other exception in it (a numba error, a bad
    sample, memory) ended the thread and left the consumer waiting on its queue forever, a hang with
    nothing printed. Here the exception is kept and the consumer's next batch raises it.
    """

    error: BaseException | None = None

    def start(self) -> None:  # EpochIterator.__init__ ends with start(): swap the queue before the thread runs
        self.output_queue = _WatchedQueue(self.output_queue.maxsize, self)
        super().start()

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:  # kept for the consumer, whose RuntimeError chains it (with its traceback)
            self.error = e


def stop_epoch_iterator(it: EpochIterator, timeout_s: float = 120.0) -> None:
    """Stop FFCV's epoch thread, wait for it, then release its batch memory.

    ``EpochIterator.close`` only raises a flag and frees the memory at once, and the thread looks at the flag
    only when its output queue is full: a consumer leaving mid-epoch (a bench window, ``--max-steps``)
    left it decoding into freed buffers, and still running numba/OpenCV code when the interpreter shut
    down, which ended the process with "terminate called without an active exception" (exit 134). So:
    flag, join (it finishes at most the few batches that fill its queue), and only then free.
    """
    it.terminate_event.set()
    if it.is_alive():
        it.join(timeout_s)
    it.close()


class _CopyBuffers:
    """Where ``FfcvLoader`` copies batches out of FFCV's buffers (which FFCV overwrites a few batches later):
    per view and kind, a few buffers of its own, each reused once no tensor outside this object shares its
    memory.

    A fresh array per copy was faulted in page by page: 20 of the 63 page faults per image in the
    CPU-only configuration (the rest are FFCV's own buffers, allocated anew every epoch). A consumer
    that keeps its batches gets new buffers (at most ``keep`` per view and kind are kept for reuse; the
    rest are left to their holders)."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.buffers: dict[tuple, list[tuple[torch.Tensor, int]]] = {}

    def _buffer(self, key: tuple, shape: tuple, dtype, new) -> torch.Tensor:
        """A buffer of ``shape`` and ``dtype`` that no one outside holds, reused, or else ``new()``.

        (A key's buffers all have one memory layout: a view of a loader always comes out of FFCV alike.)"""
        kept = self.buffers.setdefault(key, [])
        for buf, alone in kept:  # held only here: the storage's use count as it was when the buffer was made
            if buf.shape == shape and buf.dtype == dtype and alone >= 0 and _storage_use_count(buf) == alone:
                return buf
        buf = torch.from_numpy(new())
        if len(kept) < self.keep:
            kept.append((buf, _storage_use_count(buf)))  # (-1 where torch cannot tell: never reused)
        return buf

    def copy(self, view: int, x: torch.Tensor) -> torch.Tensor:
        """A copy of CPU tensor ``x`` (same shape, its axes in memory in ``x``'s order, dense), a tensor of its own."""
        src = x.numpy()
        buf = self._buffer((view, "copy"), x.shape, x.dtype, lambda: np.empty_like(src, order="K"))
        np.copyto(buf.numpy(), src)
        return buf[:]  # a tensor of the caller's: it counts as a holder of the memory while it lives

    def normalised(self, view: int, x: torch.Tensor, table: np.ndarray, planar: bool) -> torch.Tensor:
        """uint8 views (n, S, S, 3) -> normalised float32 (n, 3, S, S) if ``planar``, else (n, S, S, 3), by
        ``ffcv_ops.normalize_views`` (``table``: ``normalization_table``), a tensor of the caller's."""
        n, h, w, c = x.shape
        shape = (n, c, h, w) if planar else (n, h, w, c)
        buf = self._buffer((view, "normalised"), torch.Size(shape), torch.float32, lambda: np.empty(shape, np.float32))
        normalize_views(x.numpy(), buf.numpy(), planar, table)
        return buf[:]


class FfcvLoader:
    """Dual-view (LUT) or single-view (MAE) batches from a ``.beton`` file (``contract.Loader``); see the module doc.

    ``AugSpec``: every value but ``src_padding_mode`` other than reflect and ``interpolation`` other
    than bicubic (``contract.AUG_LIMITS``).
    """

    backend = "ffcv"

    def __init__(self, data: str | Path, options: LoaderOptions, split: str = "train", order: str = "random",
                 os_cache: bool = True, batches_ahead: int = 3):
        check_aug_support(self.backend, options.spec)
        spec, batch_size, num_workers, seed = options.spec, options.batch_size, options.num_workers, options.seed
        device, channels_last, photometric_on = options.device, options.channels_last, options.photometric_on
        rank, world_size = options.rank, options.world_size
        self.path = resolve_beton(data, split)
        formats.warn_if_storage_cannot_serve(self.path, spec.recipe, spec.img_size, split, rank)
        self.spec, self.device, self.channels_last = spec, torch.device(device), channels_last
        self.photometric_on = resolve_photometric_on(photometric_on, self.device)
        # CPU-only training: normalised float32, written as the batch is copied out of FFCV's buffers (one
        # pass the copy needs anyway); towards a GPU, uint8 (a quarter of the bytes over PCIe).
        self.float_out = self.device.type == "cpu" and self.photometric_on == "loader"
        self._table = normalization_table(spec)
        # view 2's kernel takes its working buffers per image (photometric_numba.strong_hwc): keep freed
        # memory for reuse rather than faulting it in again (pipelines/malloc.py)
        malloc.keep_freed_memory()
        self.seed, self.rank = seed, rank
        if order not in ORDERS:
            raise UserError(f"FFCV order must be one of {', '.join(ORDERS)}, got {order!r}")
        distributed = world_size > 1
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise UserError("FFCV with world_size > 1 needs an initialised torch.distributed process group")
        if distributed and order == "quasi_random":
            raise UserError("FFCV's quasi_random order does not support several processes: use order=random")
        workers = max(1, min(num_workers or 1, numba.config.NUMBA_NUM_THREADS))
        threads = torch.get_num_threads()
        try:
            self.loader = Loader(
                str(self.path), batch_size=batch_size, num_workers=workers, os_cache=os_cache, order=ORDERS[order],
                distributed=distributed, seed=seed, pipelines=self._pipelines(), drop_last=True,
                batches_ahead=batches_ahead,
            )
        finally:
            torch.set_num_threads(threads)  # belt and braces: see _keep_torch_threads
        self.outputs = list(self.loader.pipeline_specs)  # FFCV returns one tensor per pipeline, in this order
        if len(self.loader) == 0:
            raise UserError(f"{self.path} has too few images for batch size {batch_size} x {world_size} process(es)")
        self.batch_size = batch_size
        self.epoch, self.start_batch = 0, 0
        self._copies = _CopyBuffers()

    def _device_ops(self) -> list:
        return [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else [])

    def _pipelines(self) -> dict:
        sp = self.spec
        labels = [IntDecoder(), *self._device_ops()]
        if sp.recipe == "mae":
            return {"image": [RrcFlipDecoder(sp), *self._device_ops()], "label": labels}
        decoder = SrcViewsDecoder(sp, views=2)
        if self.photometric_on == "device":  # both views leave as uint8 crops; view 2's ops run in finish_batch
            return {"image": [decoder, *self._device_ops()], "label": labels}
        return {
            "image": PipelineSpec("image", decoder=decoder, transforms=[TakeView(0), *self._device_ops()]),
            "label": labels,
            "image2": PipelineSpec(source=decoder, transforms=[StrongView(sp, 1), *self._device_ops()]),
        }

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _raw(self, fresh: bool) -> Iterator[RawBatch]:
        """The epoch's raw batches; ``fresh`` copies out of FFCV's buffers, which it reuses a few batches later."""
        # Loader.__iter__ without its side effects: the epoch is ours, and skipped batches are never decoded.
        self.loader.next_epoch = self.epoch
        order = self.loader.next_traversal_order()[: len(self) * self.batch_size]
        Compiler.set_num_threads(self.loader.num_workers)
        it = WatchedEpochIterator(self.loader, order[self.start_batch * self.batch_size :])
        names = self.outputs
        try:
            for k, out in enumerate(it, start=self.start_batch):
                out = dict(zip(names, out))
                images, params = out["image"], None
                if images.dim() == 5:  # (B, 2, S, S, 3): both views straight from the decoder (device mode)
                    view1, view2 = self._nchw(images[:, 0], fresh, 0), self._nchw(images[:, 1], fresh, 1)
                    params = strong_params_for_batch(self.spec, images.shape[0], self.seed, self.epoch, self.rank, k)
                else:
                    view1 = self._nchw(images, fresh, 0)
                    view2 = self._nchw(out["image2"], fresh, 1) if "image2" in out else None
                yield RawBatch(view1=view1, view2=view2, labels=out["label"].reshape(-1).clone(), strong_params=params)
        finally:
            stop_epoch_iterator(it)

    def _nchw(self, x: torch.Tensor, fresh: bool, view: int) -> torch.Tensor:
        """A uint8 view (B, S, S, 3) as (B, 3, S, S); copied out of FFCV's buffer if ``fresh``, and normalised
        to float32 (NCHW memory, or NHWC where channels-last) in that copy on a CPU-only run.

        The copy is numba's or numpy's, one thread, in this process: torch's would run on every OpenMP
        thread of the trainer and, on a busy machine, spend ten times the copy's CPU time spinning. It
        goes into memory of this loader's (``_CopyBuffers``), reused once the consumer has let go of it.
        """
        if self.float_out:
            y = self._copies.normalised(view, x, self._table, planar=not self.channels_last)
            return y.permute(0, 3, 1, 2) if self.channels_last else y
        if fresh:
            x = self._copies.copy(view, x) if x.device.type == "cpu" else x.clone()
        return x.permute(0, 3, 1, 2)

    def raw_batches(self) -> Iterator[RawBatch]:
        """The CPU side alone: uint8 views (normalised float32 on a CPU-only run), each a tensor of the caller's."""
        return self._raw(fresh=True)

    def __iter__(self) -> Iterator[Batch]:
        # finish_batch turns uint8 into new float tensors; a CPU-only run's views come normalised (and copied).
        for raw in self._raw(fresh=False):
            yield finish_batch(raw, self.spec, self.device, self.channels_last)

    def close(self) -> None:
        """Nothing to release between epochs: each epoch's iterator (and its thread) is closed when the epoch ends."""
