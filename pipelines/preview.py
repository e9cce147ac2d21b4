"""``lut-fast data preview``: a PNG grid of what a backend feeds the model, for a person to look at.

Each cell is one sample: view 1 (crop and flip only) beside view 2
(crop, flip, color jitter, then grayscale, solarize or blur). The
MAE recipe has one view per sample. Images are un-normalised with the
spec's mean/std, so what you see is exactly the tensor the trainer gets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lut_fast.errors import UserError

from . import build_loader
from .spec import AugSpec


def to_uint8(views: torch.Tensor, spec: AugSpec) -> np.ndarray:
    """Normalised (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x = (views.detach().float().cpu() * std + mean).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_preview(backend: str, data: str | None, out: str | Path, method: str = "lut", img_size: int = 224,
                  samples: int = 8, seed: int = 0, split: str = "train", per_row: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if samples < 1:
        raise UserError(f"--samples must be positive, got {samples}")
    spec = AugSpec.for_method(method, img_size)
    loader = build_loader(backend, data, spec, batch_size=samples, num_workers=2, seed=seed, split=split)
    loader.set_epoch(0)
    batch = next(iter(loader))
    v1 = to_uint8(batch.view1, spec)
    v2 = to_uint8(batch.view2, spec) if batch.view2 is not None else None
    views = 1 if v2 is None else 2
    rows, cols = -(-samples // per_row), min(samples, per_row) * views
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(samples):
        r, c = divmod(i, per_row)
        axes[r, c * views].imshow(v1[i])
        axes[r, c * views].set_title(f"#{i} view 1" if views == 2 else f"#{i}", fontsize=8)
        if v2 is not None:
            axes[r, c * views + 1].imshow(v2[i])
            axes[r, c * views + 1].set_title("view 2", fontsize=8)
    what = "view 1 (crop + flip) | view 2 (+ jitter and one op)" if views == 2 else "MAE RandomResizedCrop view"
    fig.suptitle(f"backend {backend}, {method.upper()} recipe, {img_size} px: {what}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
