"""Random masking: one noise vector per sample, ``argsort`` gives the shuffle.

MAE keeps the first K shuffled indices. LUT shares the same shuffle between
its two views: view 1 keeps ``ids[:K]`` and view 2 keeps ``ids[K:2K]``, so
their visible sets are disjoint (docs/METHOD.md, "3. Masking").

SimMIM masks square blocks of patches instead (``block_mask``): the image is cut
into blocks of ``mask_patch_size`` pixels, one noise value per block, the blocks
with the highest noise are masked (ceil(blocks * r) of them), and each block's
mask covers all its patches. LUT on SimMIM shares the block shuffle between
the two views the same way: view 1 keeps the first V blocks, view 2 the next V
(docs/METHOD.md, "LUT on SimMIM").
"""

from __future__ import annotations

import math

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


# ---------------------------------------------------------------- SimMIM's block-wise masking


def mask_grid(img_size: int, patch_size: int, mask_patch_size: int) -> tuple[int, int]:
    """(blocks per side, patches per block side): 224 px, patch 16, blocks of 32 px -> (7, 2)."""
    if mask_patch_size % patch_size or img_size % mask_patch_size:
        raise ValueError(
            f"mask patch size {mask_patch_size} must be a multiple of the patch size {patch_size} "
            f"and divide the image size {img_size}"
        )
    return img_size // mask_patch_size, mask_patch_size // patch_size


def num_masked_blocks(num_blocks: int, mask_ratio: float) -> int:
    """SimMIM's count, ceil(blocks * r): 30 of 49 blocks at r = 0.6 (its code rounds up, MAE's K rounds down)."""
    return math.ceil(num_blocks * mask_ratio)


def block_mask(noise: torch.Tensor, blocks_per_side: int, scale: int, num_masked: int, view: int = 0) -> torch.Tensor:
    """(B, L) patch mask in row-major patch order, 1 = masked, from per-block ``noise`` (B, blocks**2).

    Blocks in ascending-noise order; ``view`` v keeps blocks ``[v*V, (v+1)*V)`` visible, V = blocks - masked,
    so view 0 and view 1 see disjoint blocks. Each block's value covers its ``scale`` x ``scale`` patches.
    """
    b, num_blocks = noise.shape
    visible = num_blocks - num_masked
    ids = torch.argsort(noise, dim=1)[:, view * visible : (view + 1) * visible]
    blocks = torch.ones(b, num_blocks, device=noise.device)
    blocks.scatter_(1, ids, 0.0)
    grid = blocks.view(b, blocks_per_side, blocks_per_side)
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).reshape(b, -1)
