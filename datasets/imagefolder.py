"""Finding images in an ImageFolder-style tree, the way torchvision does.

Class folders are sorted by name and numbered from 0, so the class-to-index
mapping matches ``torchvision.datasets.ImageFolder`` exactly; every converter
and backend gets its file list from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lut_fast.errors import UserError

# torchvision's IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageFolderIndex:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index)
    skipped_empty: list[str]  # zero-byte files, dropped at scan time

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)


def resolve_split(path: str | os.PathLike, split: str = "train") -> Path:
    """Accept a split root (``root/train/<class>/...``) or a plain class-folder tree."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"data path is not a folder: {root}")
    if (root / split).is_dir():
        return root / split
    return root


def scan_image_folder(path: str | os.PathLike, split: str = "train") -> ImageFolderIndex:
    root = resolve_split(path, split)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for idx, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / cls, followlinks=True)):
            for name in sorted(files):
                if not name.lower().endswith(IMG_EXTENSIONS):
                    continue
                full = os.path.join(dirpath, name)
                if os.path.getsize(full) == 0:
                    empty.append(full)
                    continue
                samples.append((full, idx))
    if not samples:
        raise UserError(f"no images found under {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return ImageFolderIndex(root=root, classes=classes, samples=samples, skipped_empty=empty)
