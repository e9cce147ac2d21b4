"""Which kind of data ``--data`` points at: the one place that decides.

* a ``.beton`` file, or a folder holding ``<split>.beton``     -> ``beton`` (FFCV)
* a folder (or its ``<split>/``) with a lut-fast shard manifest -> ``shards`` (DALI webdataset)
* any other folder                                            -> ``imagefolder`` (split resolved later)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lut_fast.datasets.dali_writer import MANIFEST
from lut_fast.errors import UserError

Kind = Literal["imagefolder", "beton", "shards"]


@dataclass(frozen=True)
class DataSource:
    kind: Kind
    path: Path


def detect(data: str | Path, split: str = "train") -> DataSource:
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"data not found: {path}")
    if path.is_file():
        if path.suffix == ".beton":
            return DataSource("beton", path)
        raise UserError(
            f"{path} is a file but not an FFCV .beton; --data takes an ImageFolder tree, "
            "a .beton file or a folder made by `lut-fast convert dali`"
        )
    for folder in (path / split, path):
        if (folder / MANIFEST).is_file():
            return DataSource("shards", folder)
    if (path / f"{split}.beton").is_file():
        return DataSource("beton", path / f"{split}.beton")
    return DataSource("imagefolder", path)
