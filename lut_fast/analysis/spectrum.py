"""Singular values of the feature covariance, per layer (the paper's spectral analysis, Fig. 4).

For each block, every image gives one feature vector (the mean of its patch
tokens, or the cls token, of the block's output: the residual stream before
the final norm). The covariance of the centred features over the images is
a symmetric PSD D x D matrix; its singular values (= eigenvalues) are sorted
in decreasing order. The paper forms the N x N Gram matrix instead; its
non-zero singular values are the same up to the 1 / (N - 1) factor.

With two checkpoints, the log-gap log sigma(CKPT2) - log sigma(CKPT) per layer
and rank index shows where the second one spreads its features more.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lut_fast.analysis.common import analysis_samples, labelled_encoders, require_checkpoints, walk_blocks
from lut_fast.errors import UserError
from lut_fast.evaluation.config import SpectrumConfig, with_overrides
from lut_fast.evaluation.common import (
    POOLS, image_loader, normalize, pool_tokens, progress, resolve_device, save_figure, tracked, write_json,
)


def covariance_spectrum(features: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of the covariance of ``features`` (N, D), rows = samples."""
    x = features.double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise UserError("the spectrum needs at least 2 feature vectors")
    x = x - x.mean(dim=0, keepdim=True)
    cov = x.T @ x / (x.shape[0] - 1)
    return torch.linalg.svdvals(cov)


@torch.no_grad()
def layer_features(encoder, samples, device, pool: str = "mean", batch_size: int = 64, workers: int = 2,
                   crop_pct: float = 0.875, bar=None, description: str = "features") -> list[torch.Tensor]:
    """One (N, D) feature matrix per block."""
    if pool not in POOLS:
        raise UserError(f"unknown pooling {pool!r}; choose {' or '.join(POOLS)}")
    encoder = encoder.to(device).eval()
    loader = image_loader(samples, encoder.patch_embed.img_size[0], batch_size, workers, crop_pct, device)
    per_layer: list[list[torch.Tensor]] = [[] for _ in encoder.blocks]
    for x, _ in tracked(bar, loader, description):
        _, tokens = walk_blocks(encoder, normalize(x, device), want_tokens=True)
        for i, t in enumerate(tokens):
            per_layer[i].append(pool_tokens(t, pool).float().cpu())
    return [torch.cat(f) for f in per_layer]


def run_spectrum(ckpts: Sequence[str | Path], cfg: SpectrumConfig | None = None, out: Path = Path("runs/analysis"),
                 show_progress: bool = True, **overrides) -> dict:
    """Per-layer covariance spectra of one or two checkpoints; writes spectrum.{json,png} into ``out``."""
    cfg = with_overrides(SpectrumConfig, cfg, overrides)
    require_checkpoints(ckpts)
    if len(ckpts) > 2:
        raise UserError(f"spectrum compares at most two checkpoints, got {len(ckpts)}")
    t0 = time.perf_counter()
    dev = resolve_device(cfg.device)
    samples, splits = analysis_samples(cfg.data, cfg.split, cfg.max_images, cfg.val_fraction, cfg.seed)
    results = []
    with progress(show_progress) as bar:
        for name, _, encoder, info in labelled_encoders(ckpts, cfg):
            feats = layer_features(encoder, samples, dev, cfg.pool, cfg.batch_size, cfg.workers, cfg.crop_pct, bar,
                                   f"spectrum {name}")
            spectra = [covariance_spectrum(f) for f in feats]
            results.append({"label": name, "encoder": info, "singular_values": [s.tolist() for s in spectra]})
    result = {
        "command": "spectrum",
        "pool": cfg.pool,
        "features": "block outputs (residual stream, before the final norm), one vector per image",
        "images": len(samples),
        "split": cfg.split,
        "data": splits.describe(),
        "checkpoints": results,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    rank = max(1, len(samples) - 1)  # centred features of N images span at most N - 1 dimensions
    result["max_rank"] = rank
    if len(results) == 2:
        result["log_gap"] = log_gap(results[0]["singular_values"], results[1]["singular_values"], rank)
        result["log_gap_definition"] = f"ln sigma({results[1]['label']}) - ln sigma({results[0]['label']})"
    out = Path(out)
    write_json(result, out / "spectrum.json")
    plot_spectrum(results, out / "spectrum.png", rank)
    result["png"] = str(out / "spectrum.png")
    return result


def _safe_log(s: Sequence[float], floor: float = 1e-12) -> np.ndarray:
    return np.log(np.maximum(np.asarray(s, dtype=np.float64), floor))


def log_gap(a: list[list[float]], b: list[list[float]], max_rank: int | None = None) -> list[list[float]]:
    """Per layer: ln sigma_b - ln sigma_a over the common rank indices (layers and widths may differ)."""
    layers = min(len(a), len(b))
    out = []
    for i in range(layers):
        n = min(len(a[i]), len(b[i]), max_rank or len(a[i]))
        out.append((_safe_log(b[i][:n]) - _safe_log(a[i][:n])).tolist())
    return out


def plot_spectrum(results: list[dict], path: Path, max_rank: int | None = None) -> Path:
    """ln singular values per layer (one panel per checkpoint) and, for two, the log-gap; ranks past ``max_rank`` (zeros) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(results) + (1 if len(results) == 2 else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    axes = axes[0]
    cmap = plt.get_cmap("viridis")
    shown = [[s[:max_rank] for s in r["singular_values"]] for r in results]
    ymin = min(float(_safe_log(s).min()) for sv in shown for s in sv)
    ymax = max(float(_safe_log(s).max()) for sv in shown for s in sv)
    for ax, r, sv in zip(axes, results, shown):
        for i, s in enumerate(sv):
            ax.plot(np.arange(1, len(s) + 1), _safe_log(s), color=cmap(i / max(1, len(sv) - 1)), lw=1.2, label=f"layer {i + 1}")
        ax.set_title(f"{r['label']}: ln singular values", fontsize=10)
        ax.set_xlabel("singular value rank index")
        ax.set_ylabel("ln sigma")
        ax.set_ylim(ymin - 0.5, ymax + 0.5)
        ax.grid(alpha=0.3)
    if len(results) == 2:
        ax = axes[-1]
        gap = log_gap(results[0]["singular_values"], results[1]["singular_values"], max_rank)
        for i, g in enumerate(gap):
            ax.plot(np.arange(1, len(g) + 1), g, color=cmap(i / max(1, len(gap) - 1)), lw=1.2, label=f"layer {i + 1}")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_title(f"ln sigma({results[1]['label']}) - ln sigma({results[0]['label']})", fontsize=10)
        ax.set_xlabel("singular value rank index")
        ax.set_ylabel("log gap")
        ax.grid(alpha=0.3)
    handles, lbls = axes[0].get_legend_handles_labels()
    step = max(1, len(handles) // 12)  # at most ~12 legend entries for deep models
    fig.legend(handles[::step], lbls[::step], loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
