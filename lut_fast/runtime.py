"""Device, precision and autocast: one set of rules for training, the bench and evaluation.

* ``resolve_device``: ``auto`` (a CUDA GPU when there is one), ``cpu``, ``cuda``
  or ``cuda:N``; asking for CUDA without a GPU is a one-line error.
* ``resolve_precision``: the autocast dtype a *training* run uses (None = fp32).
  ``auto`` is bf16 on GPUs that have it, fp16 with loss scaling on those that do
  not (V100), fp32 on the CPU.
* ``inference_precision``: what evaluation, analysis and the online k-NN use:
  bf16 where the GPU has it, else fp32 (features are compared across runs, so
  no fp16 without a loss scale to protect it).
* ``autocast(device, dtype)``: ``torch.autocast``, or nothing for fp32.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from lut_fast.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def _bf16_on(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The training autocast dtype (None = fp32)."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name == "fp32":
        return None
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bf16; use --precision fp16 (with loss scaling) or auto")
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if _bf16_on(device) else torch.float16


def inference_precision(device: torch.device) -> Optional[torch.dtype]:
    """bf16 on GPUs that have it, else fp32."""
    return torch.bfloat16 if _bf16_on(device) else None


def precision_name(dtype: Optional[torch.dtype]) -> str:
    return _NAMES[dtype]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_autocast(device: torch.device):
    """Evaluation's autocast: bf16 on GPUs that have it (callers return features in fp32); nothing on CPU."""
    return autocast(device, inference_precision(device))
