"""The FFCV backend: a ``.beton`` file -> ``Batch``, the views built by numba operations.

LUT: one JPEG decode and one shorter-side resize per image, shared by both
views (``ffcv_ops.SrcViewsDecoder``); view 1 is a zero-copy view of the
decoder's output, view 2 runs ``StrongView`` into its own buffer. MAE:
``RrcFlipDecoder`` (torchvision's RandomResizedCrop box rule, ``spec.rrc_*``,
and the flip). The pipelines emit uint8 NHWC; ``normalize_uint8`` converts on the
trainer's device, so a GPU receives a quarter of the bytes.

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
a fresh tensor (normalisation allocates the views; labels are cloned).

Threads: FFCV's ``num_workers`` are numba threads (at most the core count).
FFCV also sets torch's process-wide thread count on every epoch, which
would starve (or oversubscribe) the trainer's own CPU work; ``_keep_torch_threads``
makes it set only numba's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numba
import torch

from lut_fast.errors import UserError

from . import formats
from .batch import Batch, resolve_photometric_on, normalize_uint8
from .ffcv_ops import RrcFlipDecoder, SrcViewsDecoder, StrongView, TakeView  # first: keeps torch's thread count
from .spec import AugSpec

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
        return source.path
    if source.kind == "shards":
        raise UserError(f"{source.path} holds DALI shards; FFCV reads .beton files: use --backend dali, "
                        "or convert the image folder with `lut-fast convert ffcv SRC_DIR OUT.beton`")
    raise UserError(f"FFCV reads .beton files, and {source.path} is an image folder: convert it first with "
                    f"`lut-fast convert ffcv {source.path} OUT.beton --split {split}` and pass --data OUT.beton")


class FfcvLoader:
    """Dual-view (LUT) or single-view (MAE) batches from a ``.beton`` file; see the module doc."""

    backend = "ffcv"

    def __init__(
        self,
        data: str | Path,
        spec: AugSpec,
        batch_size: int,
        device: torch.device | str = "cpu",
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        split: str = "train",
        order: str = "random",
        os_cache: bool = True,
        batches_ahead: int = 3,
        photometric_on: str = "auto",
    ):
        self.path = resolve_beton(data, split)
        self.spec, self.device, self.channels_last = spec, torch.device(device), channels_last
        self.photometric_on = resolve_photometric_on(photometric_on, self.device)
        if photometric_on == "device":
            raise UserError("the FFCV backend applies view 2's photometric ops in its pipeline: use photometric_on=loader")
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

    def _device_ops(self) -> list:
        return [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else [])

    def _pipelines(self) -> dict:
        sp = self.spec
        labels = [IntDecoder(), *self._device_ops()]
        if sp.recipe == "mae":
            return {"image": [RrcFlipDecoder(sp), *self._device_ops()], "label": labels}
        decoder = SrcViewsDecoder(sp, views=2)
        return {
            "image": PipelineSpec("image", decoder=decoder, transforms=[TakeView(0), *self._device_ops()]),
            "label": labels,
            "image2": PipelineSpec(source=decoder, transforms=[StrongView(sp, 1), *self._device_ops()]),
        }

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        out = normalize_uint8(x.permute(0, 3, 1, 2), self.spec, self.device, self.channels_last)
        return out if self.channels_last else out.contiguous()

    def __iter__(self) -> Iterator[Batch]:
        # Loader.__iter__ without its side effects: the epoch is ours, and skipped batches are never decoded.
        self.loader.next_epoch = self.epoch
        order = self.loader.next_traversal_order()[: len(self) * self.batch_size]
        Compiler.set_num_threads(self.loader.num_workers)
        it = EpochIterator(self.loader, order[self.start_batch * self.batch_size :])
        names = self.outputs
        try:
            for out in it:
                out = dict(zip(names, out))
                yield Batch(
                    view1=self._view(out["image"]),
                    view2=self._view(out["image2"]) if "image2" in out else None,
                    labels=out["label"].reshape(-1).clone().to(self.device, non_blocking=True),
                )
        finally:
            it.close()  # stops FFCV's thread when the consumer leaves mid-epoch
