"""What every data backend promises: the ``Loader`` protocol, its constructor options, and the ``AugSpec`` values it honours.

``build_loader`` (``pipelines/__init__.py``) is the one place that picks a backend; the trainer,
the bench and the evaluations only rely on what is declared here:

* ``LoaderOptions``: the settings every backend's constructor takes (one dataclass, not three
  copies of the same keyword list); backend-only settings stay keyword arguments of that backend.
* ``Loader``: ``len()`` (full batches per epoch and rank; the last partial batch is dropped),
  ``set_epoch(epoch, start_batch)`` (the epoch's order, starting ``start_batch`` batches in, for
  exact resume), iteration yielding ``Batch`` on the device, ``raw_batches()`` (the CPU side
  alone, for the bench), and ``close()``.
* ``AUG_LIMITS``: the ``AugSpec`` fields a backend implements only in part, with the values it
  does implement. ``check_aug_support`` turns any other value into a one-line ``UserError``
  before a batch is made, instead of the backend quietly using its own value. A field not listed
  for a backend is honoured as the spec says (``docs/BACKENDS.md`` lists the known numerical
  differences, e.g. the resize filter used when shrinking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

from lut_fast.errors import UserError

from .spec import AugSpec

if TYPE_CHECKING:
    from .batch import Batch, RawBatch


@dataclass(frozen=True)
class LoaderOptions:
    """The constructor settings the three backends share (``build_loader`` fills them)."""

    spec: AugSpec  # how the views are made
    batch_size: int  # images per batch and process
    device: Any = "cpu"  # torch.device or name: where batches are delivered
    num_workers: int = 2  # loader threads / processes (torch), DALI threads, FFCV (numba) threads
    seed: int = 0  # data order and augmentation seed
    rank: int = 0  # this process's shard of each epoch
    world_size: int = 1  # processes sharing an epoch
    channels_last: bool = False  # deliver float views in channels-last memory
    photometric_on: str = "auto"  # where view 2's jitter and 3-augment run: loader | device | auto

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise UserError(f"batch size must be positive, got {self.batch_size}")


@runtime_checkable
class Loader(Protocol):
    """A data backend's loader, as the trainer, bench and evaluations use it."""

    backend: str  # "torch" | "dali" | "ffcv"
    spec: AugSpec

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __iter__(self) -> Iterator["Batch"]: ...

    def raw_batches(self) -> Iterator["RawBatch"]: ...

    def close(self) -> None: ...


# Per backend: AugSpec field -> the values it implements. Fields not named: every value.
AUG_LIMITS: dict[str, dict[str, tuple]] = {
    "torch": {},
    # DALI pads view 1 and view 2's crop source with its own reflect padding (slices of one padded image).
    "dali": {"src_padding_mode": ("reflect",)},
    # FFCV's numba kernels pad by reflection; its resize is OpenCV's INTER_AREA when shrinking and bicubic
    # when enlarging, which is what aug.interpolation=bicubic asks for (the default); no other filter exists.
    "ffcv": {"src_padding_mode": ("reflect",), "interpolation": ("bicubic",)},
}
# Fields that only the LUT recipe's simple random crop uses: the MAE view ignores them in every backend.
_SRC_ONLY = {"src_padding", "src_padding_mode"}


def check_aug_support(backend: str, spec: AugSpec) -> None:
    """A one-line ``UserError`` when ``spec`` asks ``backend`` for a value it does not implement."""
    for name, allowed in AUG_LIMITS.get(backend, {}).items():
        if name in _SRC_ONLY and spec.recipe != "lut":
            continue
        value = getattr(spec, name)
        if value not in allowed:
            raise UserError(
                f"the {backend} backend does not implement aug.{name}={value!r} (only {', '.join(map(repr, allowed))}): "
                f"use --backend torch, or leave aug.{name} at its default"
            )
