"""View 2's photometric parameters for loaders that leave those ops to the device.

FFCV and DALI build their views in threads whose random streams are not
addressable per sample, so when the target view's jitter and 3-augment op
run in ``batch.finish_batch`` (``photometric_on="device"``) the loader draws
the whole batch's parameters in the main process, from a generator seeded by
(seed, epoch, rank, batch index). The parameters of batch i of epoch e are
then the same whether the epoch ran from its start or was resumed at i, and
ranks do not repeat each other's augmentations. The distribution is
``photometric.sample_params``, the same as the torch backend's.
"""

from __future__ import annotations

import numpy as np
import torch

from . import photometric
from .spec import AugSpec


def batch_generator(seed: int, epoch: int, rank: int, batch_index: int) -> torch.Generator:
    """A torch generator that depends only on (seed, epoch, rank, batch index)."""
    state = np.random.SeedSequence([seed, epoch, rank, batch_index]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def strong_params_for_batch(spec: AugSpec, n: int, seed: int, epoch: int, rank: int, batch_index: int) -> torch.Tensor:
    """(n, photometric.NUM_PARAMS) parameters of view 2's ops for one batch."""
    return photometric.sample_params(spec, n, batch_generator(seed, epoch, rank, batch_index))
