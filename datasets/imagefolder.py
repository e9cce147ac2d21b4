"""Finding images in an ImageFolder-style tree, the way torchvision does.

Class folders are sorted by name and numbered from 0, so the class-to-index
mapping matches ``torchvision.datasets.ImageFolder`` exactly; every converter
and backend gets its file list from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
    skipped_other: list[str] = field(default_factory=list)  # files without an image extension (not hidden ones)

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


def _list_dir(path: str) -> list[os.DirEntry]:
    """The entries of one folder (one place, so tests can deny a read where permission bits cannot: as root)."""
    with os.scandir(path) as it:
        return list(it)


def _unreadable_folder(path: str, e: OSError) -> UserError:
    why = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
    return UserError(f"cannot read the folder {path} ({why}): its images would be silently missing; "
                     "fix its permissions or move it out of the data folder")


def _walk(top: str, seen_dirs: set[tuple[int, int]]):
    """``os.walk(top, followlinks=True)`` in sorted order that enters each real folder once.

    Symbolic links to folders are followed (datasets are often assembled from
    links), but a folder already entered, through a loop or a second link, is
    not entered again. A folder that cannot be listed is an error, not a
    silently missing class.
    """
    try:
        st = os.stat(top)
    except OSError as e:
        raise _unreadable_folder(top, e) from None
    if (st.st_dev, st.st_ino) in seen_dirs:
        return
    seen_dirs.add((st.st_dev, st.st_ino))
    try:
        entries = sorted(_list_dir(top), key=lambda e: e.name)
    except OSError as e:
        raise _unreadable_folder(top, e) from None
    dirs, files = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows links; a dangling or looping link is not a folder
        except OSError:
            is_dir = False
        (dirs if is_dir else files).append(entry.name)
    yield top, files
    for name in dirs:
        yield from _walk(os.path.join(top, name), seen_dirs)


def scan_image_folder(path: str | os.PathLike, split: str = "train") -> ImageFolderIndex:
    root = resolve_split(path, split)
    try:
        top = _list_dir(str(root))
    except OSError as e:
        raise _unreadable_folder(str(root), e) from None
    classes = sorted(e.name for e in top if _is_dir(e) and not e.name.startswith("."))
    if not classes:
        raise UserError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    other: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    for idx, cls in enumerate(classes):
        seen_files: set[tuple[int, int]] = set()  # each real file once per class, however many links lead to it
        for dirpath, files in sorted(_walk(str(root / cls), seen_dirs)):  # torchvision sorts os.walk the same way
            for name in files:
                full = os.path.join(dirpath, name)
                if not name.lower().endswith(IMG_EXTENSIONS):
                    if not name.startswith("."):
                        other.append(full)
                    continue
                try:
                    st = os.stat(full)
                except OSError:
                    # A dangling or self-referencing link: kept, so the loaders skip and count it like any
                    # unreadable image (and the converters report it).
                    samples.append((full, idx))
                    continue
                if (st.st_dev, st.st_ino) in seen_files:
                    continue
                seen_files.add((st.st_dev, st.st_ino))
                if st.st_size == 0:
                    empty.append(full)
                    continue
                samples.append((full, idx))
    if not samples:
        raise UserError(f"no images found under {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return ImageFolderIndex(root=root, classes=classes, samples=samples, skipped_empty=empty, skipped_other=other)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
