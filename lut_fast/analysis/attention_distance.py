"""Average attention distance (AAD, the paper's Eq. 4), per layer and head.

For a query patch i, AAD_i = sum_j A_ij * ||c_i - c_j||, with c the 2-D
centre of a patch in normalised image coordinates (the image is the unit
square: c = ((col + 0.5) / G, (row + 0.5) / G) on a G x G grid); the sum runs
over patch tokens j. AAD is averaged over the query patches and the images.
The cls token is neither a query nor a key; by default each query's
attention over the patches is renormalised to sum to one (``renormalize``),
so the value is a proper mean distance; without it, the share of attention
the query puts on the cls token counts as distance 0. Values are also
reported in pixels (normalised x input size), as in the ViT paper's plot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lut_fast.analysis.common import analysis_samples, labelled_encoders, require_checkpoints, walk_blocks
from lut_fast.evaluation.config import AttentionDistanceConfig, with_overrides
from lut_fast.evaluation.common import image_loader, normalize, progress, save_figure, tracked, write_json
from lut_fast.runtime import resolve_device


def patch_centers(grid: int) -> torch.Tensor:
    """(G*G, 2) patch-centre coordinates (x, y) in [0, 1], row-major like the patch tokens."""
    idx = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(idx, idx, indexing="ij")
    return (torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1) + 0.5) / grid


def distance_matrix(grid: int) -> torch.Tensor:
    """(L, L) Euclidean distances between patch centres, normalised coordinates."""
    c = patch_centers(grid)
    return torch.cdist(c, c)


def attention_distance(attn: torch.Tensor, grid: int, num_prefix_tokens: int = 1, renormalize: bool = True) -> torch.Tensor:
    """Per-head AAD summed over images and queries: ``attn`` (B, H, P + L, P + L) -> (H,) sums and the count.

    Use ``average_attention_distance`` for the mean of one batch.
    """
    L = grid * grid
    if attn.shape[-1] != num_prefix_tokens + L or attn.shape[-2] != num_prefix_tokens + L:
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not match a {grid}x{grid} grid + {num_prefix_tokens} prefix")
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:].double()
    if renormalize:
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    d = (a * distance_matrix(grid).to(a.device)).sum(dim=-1)  # (B, H, L): per query
    return d.sum(dim=(0, 2))


def average_attention_distance(attn: torch.Tensor, grid: int, num_prefix_tokens: int = 1, renormalize: bool = True) -> torch.Tensor:
    """Eq. 4 for one batch of attention maps (B, H, N, N): (H,) mean over images and query patches."""
    b = attn.shape[0]
    return attention_distance(attn, grid, num_prefix_tokens, renormalize) / (b * grid * grid)


@torch.no_grad()
def encoder_aad(
    encoder,
    samples,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 2,
    crop_pct: float = 0.875,
    renormalize: bool = True,
    bar=None,
    description: str = "attention distance",
) -> np.ndarray:
    """(depth, heads) AAD in normalised units, averaged over the images in ``samples``."""
    encoder = encoder.to(device).eval()
    grid = encoder.grid_size
    depth = len(encoder.blocks)
    sums = torch.zeros(depth, encoder.num_heads, dtype=torch.float64)
    count = 0
    loader = image_loader(samples, encoder.patch_embed.img_size[0], batch_size, workers, crop_pct, device)
    for x, _ in tracked(bar, loader, description):
        attns, _ = walk_blocks(encoder, normalize(x, device), want_attention=range(depth))
        for i in range(depth):
            sums[i] += attention_distance(attns[i].float(), grid, 1, renormalize).cpu()
        count += x.shape[0] * grid * grid
    return (sums / count).numpy()


def run_attention_distance(ckpts: Sequence[str | Path], cfg: AttentionDistanceConfig | None = None,
                           out: Path = Path("runs/analysis"), show_progress: bool = True, **overrides) -> dict:
    """AAD per layer and head for each checkpoint; writes attention_distance.{json,png} into ``out``."""
    cfg = with_overrides(AttentionDistanceConfig, cfg, overrides)
    require_checkpoints(ckpts)
    t0 = time.perf_counter()
    dev = resolve_device(cfg.device)
    samples, splits = analysis_samples(cfg.data, cfg.split, cfg.max_images, cfg.val_fraction, cfg.seed)
    last_layers = cfg.last
    results = []
    with progress(show_progress) as bar:
        for name, _, encoder, info in labelled_encoders(ckpts, cfg):
            aad = encoder_aad(encoder, samples, dev, cfg.batch_size, cfg.workers, cfg.crop_pct, cfg.renormalize, bar,
                              f"AAD {name}")
            results.append({
                "label": name,
                "encoder": info,
                "aad": aad.tolist(),  # [layer][head], normalised units (image side = 1)
                "aad_pixels": (aad * info["img_size"]).tolist(),
                "layer_mean": aad.mean(axis=1).tolist(),
                f"last_{last_layers}_layers_mean": float(aad[-last_layers:].mean()),
            })
    result = {
        "command": "attention-distance",
        "units": "normalised image coordinates (side = 1); aad_pixels = aad x input size",
        "renormalize": cfg.renormalize,
        "images": len(samples),
        "split": cfg.split,
        "data": splits.describe(),
        "checkpoints": results,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out = Path(out)
    write_json(result, out / "attention_distance.json")
    plot_attention_distance(results, out / "attention_distance.png")
    result["png"] = str(out / "attention_distance.png")
    return result


def plot_attention_distance(results: list[dict], path: Path) -> Path:
    """One dot per head, layers on x, checkpoints side by side in different colours; layer means as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * max(len(r["aad"]) for r in results) + 3), 4))
    n = len(results)
    colors = plt.get_cmap("tab10")
    width = 0.6 / max(n, 1)
    for ci, r in enumerate(results):
        aad = np.asarray(r["aad"])
        layers = np.arange(1, aad.shape[0] + 1)
        offset = (ci - (n - 1) / 2) * width
        xs = np.repeat(layers + offset, aad.shape[1])
        ax.scatter(xs, aad.reshape(-1), s=18, color=colors(ci % 10), alpha=0.75, label=r["label"], edgecolors="none")
        ax.plot(layers + offset, aad.mean(axis=1), color=colors(ci % 10), lw=1.2, alpha=0.9)
    depth = max(len(r["aad"]) for r in results)
    grids = sorted({r["encoder"]["img_size"] // r["encoder"]["patch_size"] for r in results if "encoder" in r})
    for g in grids:  # reference: uniform attention over all patches = the mean pairwise patch distance
        uniform = float(distance_matrix(g).mean())
        ax.axhline(uniform, color="gray", ls="--", lw=0.9)
        ax.text(depth + 0.45, uniform, f"uniform\n({g}x{g})", fontsize=7, color="gray", va="center")
    ax.set_xticks(range(1, depth + 1))
    ax.set_xlabel("layer (block)")
    ax.set_ylabel("mean attention distance\n(fraction of image side)")
    ax.set_title("Average attention distance per head (dots) and layer mean (lines)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)
