"""A small built-in image dataset, generated deterministically: no downloads.

Ten classes of procedurally drawn scenes (a shape or texture in a random
colour on a smooth, noisy, near-gray background), JPEG-encoded at a few sizes and aspect ratios, in an
ImageFolder tree with ``train/`` and ``val/`` splits. Classes differ in
structure, not in color (colors are random per image), so a k-NN or linear
probe on learned features has something real to find, and the color jitter /
grayscale / solarize augmentations do not destroy the label.

The tree is written once to a cache folder and reused; ``write_builtin``
writes it anywhere (``lut-fast data builtin OUT_DIR``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = "v2"
CLASSES = ("checker", "circle", "cross", "dots", "rings", "square", "star", "stripes", "triangle", "waves")
SIZES = ((96, 96), (128, 96), (96, 128), (112, 80), (144, 112))  # (width, height)
TRAIN_PER_CLASS = 48
VAL_PER_CLASS = 16


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth, low-saturation field with mild noise.

    v1 used saturated random colours here; features then matched images by
    their backgrounds, and k-NN after a short run stayed near chance. With
    near-gray backgrounds the shape is what distinguishes a class.
    """
    base = rng.uniform(60, 200)
    tint = rng.uniform(-15, 15, size=3)
    coarse = np.clip(base + tint + rng.normal(0, 20, size=(4, 4, 1)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 8, size=(h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        rad = r if (k % 2 == 0 or inner is None) else r * inner
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_example(cls: str, rng: np.random.Generator) -> Image.Image:
    w, h = SIZES[rng.integers(len(SIZES))]
    img = _background(rng, w, h)
    d = ImageDraw.Draw(img)
    fg, fg2 = _color(rng), _color(rng)
    s = min(w, h)
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    r = s * rng.uniform(0.25, 0.4)
    rot = rng.uniform(0, 2 * math.pi)
    if cls == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif cls == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fg)
    elif cls == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=fg)
    elif cls == "star":
        d.polygon(_polygon(cx, cy, r * 1.3, 5, rot, inner=0.45), fill=fg)
    elif cls == "cross":
        t = r * 0.35
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fg)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fg)
    elif cls == "rings":
        for k in range(4, 0, -1):
            d.ellipse((cx - r * k / 4, cy - r * k / 4, cx + r * k / 4, cy + r * k / 4), fill=fg if k % 2 else fg2)
    elif cls == "stripes":
        period = int(rng.integers(8, 16))
        for x0 in range(-h, w + h, period):
            d.polygon([(x0, 0), (x0 + period // 2, 0), (x0 + period // 2 + h // 3, h), (x0 + h // 3, h)], fill=fg)
    elif cls == "checker":
        cell = int(rng.integers(10, 20))
        for y in range(0, h, cell):
            for x in range(0, w, cell):
                if (x // cell + y // cell) % 2 == 0:
                    d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fg)
    elif cls == "dots":
        for _ in range(int(rng.integers(12, 25))):
            x, y, rr = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 7)
            d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=fg)
    elif cls == "waves":
        period, amp = rng.uniform(14, 24), rng.uniform(4, 9)
        for y0 in range(0, h, int(period)):
            pts = [(x, y0 + amp * math.sin(2 * math.pi * x / period + rot)) for x in range(0, w + 4, 4)]
            d.line(pts, fill=fg, width=3)
    else:  # pragma: no cover - CLASSES is closed
        raise ValueError(cls)
    if rng.uniform() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return img


def write_builtin(out_dir: str | os.PathLike, seed: int = 0, quality: int = 90) -> Path:
    """Write the tree to ``out_dir`` (``train/<class>/*.jpg``, ``val/<class>/*.jpg``)."""
    out = Path(out_dir)
    for split, count, offset in (("train", TRAIN_PER_CLASS, 0), ("val", VAL_PER_CLASS, 10_000)):
        for ci, cls in enumerate(CLASSES):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, ci, offset + i])
                draw_example(cls, rng).save(folder / f"{cls}_{i:04d}.jpg", quality=quality)
    return out


def cache_root() -> Path:
    base = os.environ.get("LUT_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lut_fast")
    return Path(base)


def builtin_path() -> Path:
    """The cached built-in dataset, written on first use (atomically: temp folder + rename)."""
    final = cache_root() / f"builtin-{VERSION}"
    if (final / "val").is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-", dir=final.parent))
    try:
        write_builtin(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
