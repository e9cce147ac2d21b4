"""The plain torch/torchvision backend: runs anywhere, no extra packages.

Per image (in DataLoader workers): decode once (PIL, with JPEG DCT-domain
downscaling via ``draft`` so large JPEGs are decoded smaller), one shared
resize, then each view's own geometry (SRC crop + flip, or RandomResizedCrop
for MAE). The target view's photometric ops run batched (``photometric.py``),
either in the worker's collate or on the training device.

Every random choice for sample ``i`` in epoch ``e`` comes from a generator
seeded by ``(seed, e, i)``: augmentations do not depend on the number of
workers, the batch a sample lands in, or whether the run was resumed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from lut_fast.errors import UserError

from . import photometric
from .batch import Batch, RawBatch, finish_batch, resolve_photometric_on
from .spec import AugSpec

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def load_rgb(path: str, min_side: int | None = None) -> Image.Image:
    """Decode an image as RGB; JPEGs are decoded at the smallest DCT scale that keeps both sides >= ``min_side``."""
    with Image.open(path) as img:
        if min_side is not None and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, _RESAMPLE[interpolation])


def src_crop(arr: np.ndarray, spec: AugSpec, rng: np.random.Generator) -> np.ndarray:
    """Simple random crop on an HWC array whose shorter side is already S: pad, crop S x S, flip."""
    s, pad = spec.img_size, spec.src_padding
    if pad:
        arr = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode=spec.src_padding_mode)
    h, w = arr.shape[:2]
    top = int(rng.integers(0, h - s + 1))
    left = int(rng.integers(0, w - s + 1))
    out = arr[top : top + s, left : left + s]
    if rng.uniform() < spec.flip_p:
        out = out[:, ::-1]
    return out


def rrc_box(width: int, height: int, spec: AugSpec, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (left, top, w, h): torchvision's rule with our generator."""
    area = width * height
    log_ratio = (math.log(spec.rrc_ratio[0]), math.log(spec.rrc_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*spec.rrc_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(spec.rrc_ratio):
        w, h = width, int(round(width / min(spec.rrc_ratio)))
    elif in_ratio > max(spec.rrc_ratio):
        h, w = height, int(round(height * max(spec.rrc_ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def make_views(img: Image.Image, spec: AugSpec, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """uint8 CHW view 1, view 2 (before photometric ops) and view 2's photometric parameters."""
    s = spec.img_size
    if spec.recipe == "mae":
        left, top, w, h = rrc_box(*img.size, spec, rng)
        out = img.resize((s, s), _RESAMPLE[spec.interpolation], box=(left, top, left + w, top + h))
        arr = np.asarray(out)
        if rng.uniform() < spec.flip_p:
            arr = arr[:, ::-1]
        return _chw(arr), None, None
    base = np.asarray(resize_shorter(img, s, spec.interpolation))  # one resize shared by both views
    v1 = src_crop(base, spec, rng)
    v2 = src_crop(base, spec, rng)
    params = photometric.sample_params(spec, 1, torch.Generator().manual_seed(int(rng.integers(2**62))))[0]
    return _chw(v1), _chw(v2), params


class DualViewDataset(torch.utils.data.Dataset):
    """Indexed by ``(epoch, index)`` so workers need no epoch state; unreadable files are replaced and counted."""

    def __init__(self, samples: Sequence[tuple[str, int]], spec: AugSpec, seed: int = 0):
        self.samples = list(samples)
        self.spec = spec
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, epoch: int, index: int) -> tuple[Image.Image, int, int]:
        """Image, label and how many bad files were skipped to find it."""
        bad = 0
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PIL's truncated-file warnings: counted below instead
                    min_side = self.spec.img_size if self.spec.recipe == "lut" else None
                    return load_rgb(path, min_side), label, bad
            except Exception:  # noqa: BLE001 - any decode failure means "bad file"
                bad += 1
        raise UserError("no readable image in the dataset")

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        img, label, bad = self.load(epoch, index)
        v1, v2, params = make_views(img, self.spec, sample_generator(self.seed, epoch, index))
        return {"view1": v1, "view2": v2, "params": params, "label": label, "bad": bad}


@dataclass
class CollateViews:
    spec: AugSpec
    photometric_in_worker: bool

    def __call__(self, items: list[dict]) -> dict:
        out = {
            "view1": torch.stack([it["view1"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "bad": sum(it["bad"] for it in items),
            "view2": None,
            "params": None,
        }
        if items[0]["view2"] is not None:
            out["view2"] = torch.stack([it["view2"] for it in items])
            out["params"] = torch.stack([it["params"] for it in items])
            if self.photometric_in_worker:
                out["view2"] = photometric.apply_strong_uint8(out["view2"], out["params"], self.spec)
                out["params"] = None
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation, sharded across ranks, resumable mid-epoch.

    Like ``DistributedSampler(shuffle=True, drop_last=True)`` (the permutation
    depends only on (seed, epoch); shards are disjoint; the same number of
    batches per rank), but laid out by *global* batch: global batch b is
    ``perm[b*G:(b+1)*G]`` with G = batch_size * world_size, and rank r takes
    its positions ``r*B .. (r+1)*B``. So N processes see, batch for batch,
    exactly the samples one process with batch N*B sees (DDP == single
    process), and one process takes consecutive slices of the permutation.
    The ``n mod G`` samples left over are dropped (different ones each epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n // (batch_size * world_size)  # = (n // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"dataset of {n} images is too small for batch size {batch_size} x {world_size} process(es)"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)[: self.batches_per_epoch * self.batch_size * self.world_size]
        return perm.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.indices(self.epoch)[self.start_batch * self.batch_size :]
        return iter([(self.epoch, i) for i in idx])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


STOP_SIGNAL_GRACE_S = 60.0


def _worker_init(worker_id: int) -> None:
    """DataLoader workers outlive a stop signal (SIGTERM / SIGUSR1) that was meant for the trainer.

    torchrun forwards a stop signal to the training process's whole process
    group, and SLURM signals every process of a job step, so the workers get
    it too; dying at once would crash the training process before it saves
    its checkpoint. The trainer stops at its next step and ends the workers
    itself. So a signal from the training process (the DataLoader's own
    shutdown, or multiprocessing's at exit) ends the worker at once; one from
    anyone else ends it ``STOP_SIGNAL_GRACE_S`` later, if it is still there.
    """
    import os
    import signal
    import threading

    stop = {signal.SIGTERM, signal.SIGUSR1}
    parent = os.getppid()
    armed = threading.Event()

    def exit_later() -> None:
        if not armed.is_set():
            armed.set()
            timer = threading.Timer(STOP_SIGNAL_GRACE_S, os._exit, args=(0,))
            timer.daemon = True
            timer.start()

    if not hasattr(signal, "sigwaitinfo"):  # no sender information (macOS): grace period for every signal
        for sig in stop:
            signal.signal(sig, lambda signum, frame: exit_later())
        return

    def watch() -> None:
        while True:
            info = signal.sigwaitinfo(stop)
            if info.si_pid == parent:
                os._exit(0)
            exit_later()

    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to the watcher thread only
    threading.Thread(target=watch, name="stop-signal-watch", daemon=True).start()


class TorchLoader:
    """DataLoader-based dual-view loader yielding ``Batch`` on ``device``."""

    backend = "torch"

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        spec: AugSpec,
        batch_size: int,
        device: torch.device | str = "cpu",
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        photometric_on: str = "auto",
    ):
        self.spec, self.device, self.channels_last = spec, torch.device(device), channels_last
        self.photometric_on = resolve_photometric_on(photometric_on, self.device)
        self.dataset = DualViewDataset(samples, spec, seed)
        self.sampler = EpochSampler(len(samples), batch_size, seed, rank, world_size)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=CollateViews(spec, photometric_in_worker=self.photometric_on == "loader"),
            pin_memory=self.device.type == "cuda",
            drop_last=True,  # last-batch policy: drop, so every step has the full batch
            persistent_workers=num_workers > 0,
            worker_init_fn=_worker_init,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def raw_batches(self) -> Iterator[RawBatch]:
        """The CPU side alone: uint8 views (and view 2's parameters when its ops are left to the device)."""
        for raw in self.loader:
            yield RawBatch(view1=raw["view1"], view2=raw["view2"], labels=raw["labels"],
                           strong_params=raw["params"], bad_images=raw["bad"])

    def __iter__(self) -> Iterator[Batch]:
        for raw in self.raw_batches():
            yield finish_batch(raw, self.spec, self.device, self.channels_last)
