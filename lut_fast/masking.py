"""Random masking: one noise vector per sample, ``argsort`` gives the shuffle.

MAE keeps the first K shuffled indices. LUT shares the same shuffle between
its two views: view 1 keeps ``ids[:K]`` and view 2 keeps ``ids[K:2K]``, so
their visible sets are disjoint (docs/METHOD.md, "3. Masking").
"""

from __future__ import annotations

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - r)); 49 of 196 at r = 0.75."""
    return int(num_patches * (1 - mask_ratio))


def shuffle_from_noise(noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_shuffle, ids_restore): ascending noise first; ``ids_restore`` undoes the shuffle."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore


def keep_ids(ids_shuffle: torch.Tensor, k: int, view: int = 0) -> torch.Tensor:
    """Visible patch indices of ``view`` (0 or 1): disjoint slices of one shuffle."""
    return ids_shuffle[:, view * k : (view + 1) * k]


def binary_mask(ids_restore: torch.Tensor, k: int) -> torch.Tensor:
    """(B, L) in original patch order: 0 = visible in view 0, 1 = masked (the MAE loss's weights)."""
    mask = torch.ones_like(ids_restore, dtype=torch.float32)
    mask[:, :k] = 0
    return torch.gather(mask, 1, ids_restore)


def make_noise(batch: int, num_patches: int, seed: int, micro_step: int, rank: int, device) -> torch.Tensor:
    """Masking noise that depends only on (seed, micro-step, rank): a resumed run masks identically."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 1_009 + rank)
    return torch.rand(batch, num_patches, generator=g).to(device, non_blocking=True)
