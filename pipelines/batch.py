"""The one structure every backend yields; the trainer never knows which made it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import AugSpec


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

    @property
    def size(self) -> int:
        return self.view1.shape[0]


def normalize_uint8(
    x: torch.Tensor, spec: AugSpec, device: torch.device | str, channels_last: bool
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float32 on ``device``.

    Moves uint8 (4x fewer bytes over PCIe) and converts on the device.
    """
    x = x.to(device, non_blocking=True)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1) * 255.0
    out = (x.float() - mean) / std
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
