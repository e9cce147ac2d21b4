"""Dual-view data pipelines: one augmentation spec (``spec.AugSpec``), three backends.

``build_loader`` is the single entry point the trainer, bench and eval use;
every backend yields ``batch.Batch`` on the requested device.
"""

from __future__ import annotations

import importlib.util

import torch

from lut_fast.errors import UserError

from .batch import Batch, RawBatch, finish_batch
from .contract import AUG_LIMITS, Loader, LoaderOptions, check_aug_support
from .spec import AugSpec

__all__ = [
    "AUG_LIMITS", "AugSpec", "BACKENDS", "Batch", "Loader", "LoaderOptions", "RawBatch", "build_loader",
    "check_aug_support", "finish_batch", "require_backend",
]

BACKENDS = ("torch", "dali", "ffcv")

INSTALL_HINTS = {
    "dali": "DALI is not installed: pip install 'lut-fast[dali]' (or: pip install nvidia-dali-cuda130==2.4.0)",
    "ffcv": (
        "FFCV is not installed: apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
        "pip install 'lut-fast[ffcv]'"
    ),
}
_MODULES = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def require_backend(backend: str) -> None:
    """Raise a one-line UserError that says how to install a missing backend."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module = _MODULES.get(backend)
    if module is not None:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise UserError(INSTALL_HINTS[backend])


def build_loader(
    backend: str,
    data: str | None,
    spec: AugSpec,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    split: str = "train",
    photometric_on: str = "auto",
    **options,
) -> Loader:
    """A loader over ``data`` (ImageFolder tree, split root, or a backend's converted format).

    ``data=None`` means the built-in dataset. The loader keeps the ``contract.Loader`` protocol:
    ``len()`` (batches per epoch per rank), ``set_epoch(epoch, start_batch=0)``, ``raw_batches()``
    (the CPU side: ``RawBatch`` of uint8 views), ``close()``, and yields ``Batch`` (``finish_batch``
    of each raw batch). ``photometric_on``: where view 2's jitter and 3-augment op run
    (``batch.resolve_photometric_on``). ``options``: the backend's own settings (torch ``workers``;
    DALI ``shuffle_buffer``, ``prefetch``; FFCV ``order``, ``os_cache``, ``batches_ahead``).
    An ``AugSpec`` value the backend does not implement is a ``UserError`` (``contract.AUG_LIMITS``).
    """
    require_backend(backend)
    check_aug_support(backend, spec)
    common = LoaderOptions(
        spec=spec, batch_size=batch_size, device=device, num_workers=num_workers, seed=seed,
        rank=rank, world_size=world_size, channels_last=channels_last, photometric_on=photometric_on,
    )
    if data is None:
        from lut_fast.datasets.builtin import builtin_path

        data = str(builtin_path())
    if backend == "torch":
        from lut_fast.datasets.imagefolder import scan_image_folder

        from . import formats
        from .torch_backend import TorchLoader

        source = formats.detect(data, split)
        if source.kind == "beton":
            raise UserError(f"{source.path} is an FFCV .beton file, which the FFCV backend reads: use --backend ffcv "
                            "(the torch backend reads ImageFolder trees)")
        if source.kind == "shards":
            raise UserError(f"{source.path} holds DALI shards (made by `lut-fast convert dali`), which the DALI "
                            "backend reads: use --backend dali (the torch backend reads ImageFolder trees)")
        index = scan_image_folder(data, split)
        formats.warn_if_storage_cannot_serve(data, spec.recipe, spec.img_size, split, rank)  # `convert folder` output
        return TorchLoader(index.samples, common, **options)
    if backend == "dali":
        from .dali_backend import DaliLoader

        return DaliLoader(data, common, split=split, **options)
    from .ffcv_backend import FfcvLoader

    return FfcvLoader(data, common, split=split, **options)
