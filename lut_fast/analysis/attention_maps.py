"""Attention maps of one query patch, per head, overlaid on the image (the paper's Fig. 1).

The image is resized (shorter side = the model's input size) and
center-cropped. For the query patch, each head's attention over the patch
tokens of the chosen block (the last one by default) is drawn over the image
as a heat map (each map scaled to its own maximum). One row per checkpoint:
the image with the query patch outlined, then one panel per head.

``--query X,Y`` is the patch column and row (0-based) on the first
checkpoint's patch grid; for checkpoints with another grid the same image
position is used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lut_fast.analysis.common import labelled_encoders, require_checkpoints, walk_blocks
from lut_fast.errors import UserError
from lut_fast.evaluation.config import AttentionMapsConfig, with_overrides
from lut_fast.evaluation.common import center_crop, load_rgb, normalize, save_figure, to_uint8_chw, write_json
from lut_fast.runtime import resolve_device


def parse_query(text: str | None) -> tuple[int, int] | None:
    """'X,Y' -> (column, row); None -> None (the centre patch)."""
    if text is None or text.strip().lower() in ("", "center", "centre"):
        return None
    parts = text.replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = int(parts[0]), int(parts[1])
    except ValueError:
        raise UserError(f"--query takes two integers X,Y (patch column,row), got {text!r}") from None
    if x < 0 or y < 0:
        raise UserError(f"--query {text!r}: patch coordinates must be >= 0")
    return x, y


@torch.no_grad()
def query_attention(encoder, image: torch.Tensor, query_index: int, layer: int = -1) -> np.ndarray:
    """(heads, G, G) attention of patch ``query_index`` over the patch tokens in block ``layer``; ``image`` normalised (1, 3, S, S)."""
    depth = len(encoder.blocks)
    if not -depth <= layer < depth:
        raise UserError(f"--layer {layer} is out of range for a {depth}-block encoder")
    attns, _ = walk_blocks(encoder, image, want_attention=[layer])
    a = attns[layer % depth][0, :, 1 + query_index, 1:]  # (H, L), cls excluded as key
    g = encoder.grid_size
    return a.reshape(a.shape[0], g, g).float().cpu().numpy()


def run_attention_maps(ckpts: Sequence[str | Path], cfg: AttentionMapsConfig | None = None,
                       out: Path = Path("runs/analysis"), **overrides) -> dict:
    """Writes attention_maps.{png,json} into ``out``."""
    cfg = with_overrides(AttentionMapsConfig, cfg, overrides)
    require_checkpoints(ckpts)
    image, layer = Path(cfg.image), cfg.layer
    if not image.is_file():
        raise UserError(f"image not found: {image}")
    t0 = time.perf_counter()
    q = parse_query(cfg.query)
    dev = resolve_device(cfg.device)
    pil = load_rgb(str(image))
    rows, pos = [], None
    for name, ckpt, encoder, info in labelled_encoders(ckpts, cfg):
        encoder = encoder.to(dev)
        size, g = info["img_size"], encoder.grid_size
        if pos is None:  # the query as a position in [0, 1)^2, fixed by the first checkpoint's grid
            col, row = q if q is not None else (g // 2, g // 2)
            if col >= g or row >= g:
                raise UserError(f"--query {col},{row} is outside the {g}x{g} patch grid of {ckpt} (0..{g - 1})")
            pos = ((col + 0.5) / g, (row + 0.5) / g)
        col, row = min(int(pos[0] * g), g - 1), min(int(pos[1] * g), g - 1)
        crop = center_crop(pil, size, crop_pct=1.0)
        x = normalize(to_uint8_chw(crop).unsqueeze(0), dev)
        maps = query_attention(encoder, x, row * g + col, layer)
        rows.append({"label": name, "encoder": info, "query": [col, row], "grid": g, "image": np.asarray(crop), "maps": maps})
    out = Path(out)
    png = plot_attention_maps(rows, layer, out / "attention_maps.png")
    write_json(
        {
            "command": "attention-maps",
            "image": str(image),
            "layer": layer,
            "query_position": pos,
            "checkpoints": [
                {"label": r["label"], "encoder": r["encoder"], "query": r["query"], "grid": r["grid"], "attention": r["maps"].tolist()}
                for r in rows
            ],
            "png": str(png),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        out / "attention_maps.json",
    )
    return {"png": str(png), "json": str(out / "attention_maps.json"), "query_position": pos}


def plot_attention_maps(rows: list[dict], layer: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    cols = 1 + max(r["maps"].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.0 * len(rows) + 0.3), squeeze=False)
    for ri, r in enumerate(rows):
        img, size, g = r["image"], r["image"].shape[0], r["grid"]
        p = size / g
        col, row = r["query"]
        ax = axes[ri, 0]
        ax.imshow(img)
        ax.add_patch(patches.Rectangle((col * p, row * p), p, p, fill=False, edgecolor="red", lw=2))
        ax.set_title("query patch", fontsize=8)
        ax.set_ylabel(r["label"], fontsize=9)
        for h in range(cols - 1):
            ax = axes[ri, 1 + h]
            if h >= r["maps"].shape[0]:
                ax.axis("off")
                continue
            m = r["maps"][h]
            ax.imshow(img)
            ax.imshow(m / max(float(m.max()), 1e-12), cmap="inferno", alpha=0.65, extent=(0, size, size, 0),
                      interpolation="bilinear", vmin=0, vmax=1)
            ax.add_patch(patches.Rectangle((col * p, row * p), p, p, fill=False, edgecolor="cyan", lw=1))
            ax.set_title(f"head {h + 1} (max {m.max():.2f})", fontsize=8)
        for ax in axes[ri]:
            ax.set_xticks([])
            ax.set_yticks([])
    which = "last block" if layer == -1 else (f"block {layer + 1}" if layer >= 0 else f"block {layer} (from the end)")
    fig.suptitle(f"Attention of the query patch, {which}, per head (each map scaled to its maximum)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
