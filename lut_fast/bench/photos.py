"""``--data photos:N``: ImageNet-sized JPEGs cut from real photographs, made once and cached.

Decode and augmentation costs depend on what the pixels look like: smooth
synthetic noise compresses and decodes differently from a photograph. The
photographs come from packages that ship them in their wheels: matplotlib's
sample data (a core dependency, one portrait) and, when the ``bench`` extra is
installed, scikit-image's ``skimage.data`` colour photographs (astronaut, cat,
coffee, rocket, motorcycle, retina, Hubble field, microscopy). Nothing is
downloaded.

Each of the N images is a seeded random crop of one photograph (area 25-100 %
of the photograph, aspect ratio 3:4..4:3, either orientation), resized so that
its shorter side is uniform in 300-500 px (as ImageNet's training images
mostly are), then encoded as JPEG at quality 85-90. Labels: one class per
source photograph. The tree is written to a temporary folder and renamed, so a
crash never leaves half a data set in the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from lut_fast.errors import UserError

SHORTER_SIDE = (300, 500)
QUALITY = (85, 90)
AREA = (0.25, 1.0)
ASPECT = (3 / 4, 4 / 3)
VERSION = 1  # bump when the recipe above changes: the cache folder name carries it

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png")


def source_photos() -> list[Path]:
    """Colour photographs shipped inside installed packages (matplotlib always; scikit-image if installed)."""
    found: list[Path] = []
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.is_file():
            found.append(p)
    except ImportError:
        pass
    try:
        import skimage

        folder = Path(skimage.__file__).parent / "data"
        found.extend(folder / name for name in SKIMAGE_PHOTOS if (folder / name).is_file())
    except ImportError:
        pass
    return found


def _crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = width * height * rng.uniform(*AREA)
    ratio = float(np.exp(rng.uniform(np.log(ASPECT[0]), np.log(ASPECT[1]))))
    w = min(width, max(16, int(round((area * ratio) ** 0.5))))
    h = min(height, max(16, int(round((area / ratio) ** 0.5))))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return left, top, left + w, top + h


def photo_jpegs(n: int, root: Path | None = None) -> Path:
    """An ImageFolder tree (``train/<photo>/img_XXXXX.jpg``) of ``n`` crops; cached by count and sources."""
    from PIL import Image

    from lut_fast.datasets.builtin import cache_root

    if n < 1:
        raise UserError(f"--data photos:N needs N >= 1, got {n}")
    sources = source_photos()
    if not sources:
        raise UserError("no photographs found in installed packages (matplotlib's sample data, scikit-image): "
                        "use --data synthetic:N, or pip install -e '.[bench]'")
    tag = hashlib.sha1("|".join(p.name for p in sources).encode()).hexdigest()[:8]
    root = root or cache_root()
    final = root / f"bench-photos-v{VERSION}-{n}-{tag}"

    def write(tmp: Path) -> None:
        images = []
        for p in sources:
            with Image.open(p) as img:
                images.append(img.convert("RGB"))
        for i in range(n):
            rng = np.random.default_rng([11, VERSION, i])
            k = i % len(images)
            img = images[k]
            crop = img.crop(_crop_box(*img.size, rng))
            side = int(rng.integers(SHORTER_SIDE[0], SHORTER_SIDE[1] + 1))
            scale = side / min(crop.size)
            size = (max(side, round(crop.size[0] * scale)), max(side, round(crop.size[1] * scale)))
            out = crop.resize(size, Image.BICUBIC)
            if rng.uniform() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            folder = tmp / "train" / sources[k].stem
            folder.mkdir(parents=True, exist_ok=True)
            out.save(folder / f"img_{i:05d}.jpg", quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)))

    return cached_jpeg_tree(final, n, write)


def cached_jpeg_tree(final: Path, n: int, write) -> Path:
    """``final`` when it already holds ``n`` JPEGs under ``train/``; else ``write(tmp)`` fills a temporary
    folder beside it, which then replaces ``final`` whole (an interrupted build never looks finished)."""
    if (final / "train").is_dir() and sum(1 for _ in (final / "train").rglob("*.jpg")) == n:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
