"""The two structures every backend yields, and the one device stage they share.

A loader's work is split where the bytes cross to the training device:

* ``RawBatch``: what the CPU side hands over. Views are uint8 (a quarter of
  the bytes of float32 over PCIe and through worker IPC). When the target
  view's photometric ops are left to the device, ``strong_params`` carries
  their per-sample parameters (``photometric.sample_params`` / ``params_from_uniforms``),
  drawn by the loader from its own seeded randomness, so the augmentation stream does not
  depend on where the ops run.
* ``finish_batch``: the device stage, identical for every backend: copy,
  photometric ops (when still to do), normalisation, memory format.
  ``Batch`` is its result; the trainer never knows which backend made it.

Every loader exposes ``raw_batches()`` (the CPU side alone: what ``bench
data`` times for the GPU-training configuration) and iterates ``Batch`` as
``finish_batch(raw)`` for each raw batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .spec import AugSpec

PHOTOMETRIC_PLACES = ("auto", "loader", "device")


def resolve_photometric_on(photometric_on: str, device: torch.device | str) -> str:
    """'loader' (the CPU pipeline applies view 2's ops) or 'device' (``finish_batch`` does, batched).

    ``auto`` is ``device`` on CUDA (the GPU does in microseconds what costs the
    CPU milliseconds per image) and ``loader`` elsewhere. ``worker`` is the
    older name of ``loader``.
    """
    from lut_fast.errors import UserError

    place = "loader" if photometric_on == "worker" else photometric_on
    if place not in PHOTOMETRIC_PLACES:
        raise UserError(f"photometric_on must be one of {', '.join(PHOTOMETRIC_PLACES)}, got {photometric_on!r}")
    if place == "auto":
        place = "device" if torch.device(device).type == "cuda" else "loader"
    return place


@dataclass
class RawBatch:
    """A batch as the loader's CPU side produced it (see the module doc).

    Views are uint8 (B, 3, S, S) in any memory layout (an NHWC buffer
    permuted to NCHW is fine), or float32 already normalised on the device
    (DALI's GPU graph), which ``finish_batch`` passes through.
    """

    view1: torch.Tensor
    view2: torch.Tensor | None
    labels: torch.Tensor
    strong_params: torch.Tensor | None = None  # (B, photometric.NUM_PARAMS): view 2's ops still to apply
    bad_images: int = 0  # unreadable files replaced while building this batch
    bad_paths: tuple[str, ...] = ()  # their paths, where the backend knows them (torch; converters report theirs)

    @property
    def size(self) -> int:
        return self.view1.shape[0]


@dataclass
class Batch:
    """Two augmented views and labels, normalised float32, NCHW, on the trainer's device.

    ``view2`` is None for the MAE recipe (one view). Memory format is
    channels-last when the loader was asked for it (the patch-embedding conv
    is faster that way on GPUs); the logical shape is always (B, 3, S, S).
    """

    view1: torch.Tensor
    view2: torch.Tensor | None
    labels: torch.Tensor
    bad_images: int = 0  # unreadable files replaced while building this batch
    bad_paths: tuple[str, ...] = ()  # their paths, where the backend knows them (torch; converters report theirs)

    @property
    def size(self) -> int:
        return self.view1.shape[0]


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host tensor (parameters, indices, kernels) on ``device`` without waiting for the device.

    A copy from pageable memory to a GPU first waits for everything already queued on the stream
    (the previous training step too), so the trainer could not queue a step ahead of the GPU; from
    pinned memory with ``non_blocking`` it is queued like a kernel. PyTorch keeps the pinned block
    until the copy is done.
    """
    device = torch.device(device)
    if dtype is not None and t.device.type == "cpu":
        t = t.to(dtype)  # converted on the host: the copy moves the final bytes
    if device.type == "cuda" and t.device.type == "cpu":
        t = t if t.is_pinned() else t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=True)


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, dtype, device); callers never write to it."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def normalize_uint8(
    x: torch.Tensor, spec: AugSpec, device: torch.device | str, channels_last: bool
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float32 on ``device``.

    Moves uint8 (4x fewer bytes over PCIe) and converts on the device.
    """
    return _normalize(x.to(device, non_blocking=True), spec, channels_last)


def _normalize(x: torch.Tensor, spec: AugSpec, channels_last: bool, in_place: bool = False) -> torch.Tensor:
    """uint8 or float (B, 3, H, W) on the 0..255 scale -> (x - 255 mean) / (255 std), float32.

    ``in_place``: a float32 ``x`` already in the requested memory format (one
    the caller owns) is normalised where it is. Otherwise the result is a new
    tensor in that format (``normalize_into``).
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if in_place and x.dtype == torch.float32 and x.is_contiguous(memory_format=fmt):
        scale, shift = normalize_constants(spec, x.device)
        return x.mul_(scale).add_(shift)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    return normalize_into(out, x, spec)


def normalize_constants(spec: AugSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1) float32: normalised = x * scale + shift for x on the 0..255 scale."""
    device = torch.device(device)
    scale = device_constant(tuple(1.0 / (255.0 * s) for s in spec.std), torch.float32, device).view(1, 3, 1, 1)
    shift = device_constant(tuple(-m / s for m, s in zip(spec.mean, spec.std)), torch.float32, device).view(1, 3, 1, 1)
    return scale, shift


def normalize_into(out: torch.Tensor, x: torch.Tensor, spec: AugSpec) -> torch.Tensor:
    """Write ``x`` (uint8 or float, (B, 3, H, W), 0..255 scale) normalised into float32 ``out``; returns ``out``.

    Off the CPU one ``addcmul(shift, x, scale)`` (convert, scale, shift in one
    kernel). On a CPU, uint8 in: one numba pass where numba is installed
    (``photometric_numba.normalize``); else a converting copy and two in-place
    passes, measured 2-3x cheaper than the mixed-dtype broadcasting ``addcmul``,
    which TensorIterator runs through its slow type-promoting path. Both round
    twice (the product, then the sum), so they give the same floats.
    """
    if out.device.type == "cpu" and x.dtype == torch.uint8 and x.device.type == "cpu":
        from .photometric import _numba_kernels

        kernels = _numba_kernels()
        if kernels is not None:  # one compiled pass, the same two roundings as below
            kernels.normalize(x, out, spec)
            return out
    scale, shift = normalize_constants(spec, out.device)
    if out.device.type != "cpu":
        return torch.addcmul(shift, x, scale, out=out)
    if x.dtype == torch.float32:  # (the same two roundings, one pass less)
        return torch.mul(x, scale, out=out).add_(shift)
    return out.copy_(x).mul_(scale).add_(shift)


def finish_view(x: torch.Tensor, spec: AugSpec, device: torch.device, channels_last: bool,
                strong_params: torch.Tensor | None = None) -> torch.Tensor:
    """One view through the device stage: copy, photometric ops if ``strong_params``, normalise."""
    if x.dtype != torch.uint8:  # already normalised on the device by the backend
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    if strong_params is None:
        return normalize_uint8(x, spec, device, channels_last)
    from . import photometric

    # On the 0..255 scale throughout: no rescaling passes around the ops.
    y = x.to(device, non_blocking=True).float()
    y = photometric.apply_strong_(y, strong_params, spec, value_range=255.0)
    return _normalize(y, spec, channels_last, in_place=True)


def finish_batch(raw: RawBatch, spec: AugSpec, device: torch.device | str, channels_last: bool) -> Batch:
    """The device stage every backend shares (see the module doc)."""
    device = torch.device(device)
    return Batch(
        view1=finish_view(raw.view1, spec, device, channels_last),
        view2=None if raw.view2 is None else finish_view(raw.view2, spec, device, channels_last, raw.strong_params),
        labels=to_device(raw.labels, device),
        bad_images=raw.bad_images,
        bad_paths=raw.bad_paths,
    )
