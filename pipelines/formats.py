"""Which kind of data ``--data`` points at: the one place that decides.

* a ``.beton`` file, or a folder holding ``<split>.beton``     -> ``beton`` (FFCV)
* a folder (or its ``<split>/``) with a lut-fast shard manifest -> ``shards`` (DALI webdataset)
* any other folder                                            -> ``imagefolder`` (split resolved later)

``stored_metadata`` says how converted data was stored (the converters record
it: FFCV in ``<name>.meta.json`` beside the ``.beton``, DALI in the shard
manifest, ``convert folder`` in ``lut-fast-folder.json`` inside the image
folder it wrote), and ``warn_if_storage_cannot_serve`` tells the user, once, when
that storage is too small for the recipe and image size being trained.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lut_fast.datasets.dali_writer import MANIFEST
from lut_fast.datasets.sources import read_json_record
from lut_fast.errors import UserError

Kind = Literal["imagefolder", "beton", "shards"]


@dataclass(frozen=True)
class DataSource:
    kind: Kind
    path: Path


def detect(data: str | Path, split: str = "train") -> DataSource:
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"data folder (or converted file) not found: {path}")
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


METADATA_KEYS = ("shorter_side", "max_resolution", "quality", "source", "num_samples")


def stored_metadata(path: str | Path, split: str = "train") -> dict | None:
    """How converted data was stored: {"format", "shorter_side", "max_resolution", "quality", "source",
    "num_samples", ...}; None for an image folder not written by ``convert folder``, or a .beton written
    without metadata (by FFCV's own tools, or before lut-fast recorded it). A ``shorter_side`` of None means
    the images kept their size."""
    source = detect(path, split)
    if source.kind == "imagefolder":
        from lut_fast.datasets.folder_writer import read_metadata
        from lut_fast.datasets.imagefolder import resolve_split

        meta = read_metadata(resolve_split(source.path, split))
        if meta is None:
            return None
    elif source.kind == "beton":
        from lut_fast.datasets.ffcv_writer import metadata_path

        meta = read_json_record(metadata_path(source.path), missing_ok=True)
        if meta is None:
            return None
        meta.setdefault("format", "ffcv")
    else:
        from lut_fast.datasets.dali_writer import read_manifest

        manifest = read_manifest(source.path)
        meta = {**{k: v for k, v in manifest.items() if k not in ("shards", "classes")}, "format": "dali"}
        meta["classes"] = len(manifest.get("classes", []))
    for key in METADATA_KEYS:
        meta.setdefault(key, None)
    return meta


_warned: set[tuple] = set()


def storage_problem(meta: dict | None, recipe: str, img_size: int) -> str | None:
    """Why images stored as ``meta`` says cannot serve ``recipe`` at ``img_size``, or None."""
    side = (meta or {}).get("shorter_side")
    if not side:
        return None
    if side < img_size:
        return (f"the images were stored with their shorter side at {side} px, below the image size {img_size}: "
                f"every view is enlarged (blurred); convert again with --shorter-side {img_size} or without it")
    if recipe == "mae" and side < 2 * img_size:
        return (f"the images were stored with their shorter side at {side} px (sized for LUT's SRC), and MAE's "
                f"RandomResizedCrop enlarges crops of them to {img_size} px (blurred): convert with "
                f"--shorter-side {2 * img_size} or more, or without it")
    return None


def warn_if_storage_cannot_serve(path: str | Path, recipe: str, img_size: int, split: str = "train",
                                 rank: int = 0) -> None:
    """One line on stderr (rank 0, once per data/recipe/size in this process) when ``storage_problem`` finds one."""
    key = (str(path), split, recipe, img_size)
    if rank != 0 or key in _warned:
        return
    problem = storage_problem(stored_metadata(path, split), recipe, img_size)
    if problem:
        _warned.add(key)
        print(f"lut-fast: warning: {path}: {problem}", file=sys.stderr, flush=True)


def check_beton(path: Path) -> None:
    """Refuse, in one line, a .beton FFCV could not read: empty, truncated, another format or other fields.

    FFCV itself trusts the header and fails deep inside (``IndexError`` on an empty file, ``negative
    dimensions`` on a truncated one, ``file format mismatch`` on anything else).
    """
    import numpy as np
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a usable FFCV .beton ({why}): convert the image folder again with "
                         "`lut-fast convert ffcv SRC_DIR OUT.beton`")

    size = path.stat().st_size
    if size == 0:
        raise bad("empty file")
    if size < HeaderType.itemsize:
        raise bad(f"{size} bytes, shorter than FFCV's header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise bad(f"format version {int(header['version'])}, this FFCV reads {CURRENT_VERSION}; not written by FFCV?")
    num_fields, num_samples = int(header["num_fields"]), int(header["num_samples"])
    table = int(header["alloc_table_ptr"])
    descs_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if num_fields == 0 or descs_end > size:
        raise bad(f"header announces {num_fields} fields in a {size}-byte file")
    descs = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    names = [bytes(d["name"]).split(b"\0", 1)[0].decode("utf-8", "replace") for d in descs]
    types = [int(d["type_id"]) for d in descs]
    if any(t not in TYPE_ID_HANDLER for t in types):
        raise bad("unknown field types in its header")
    wanted = {"image": 2, "label": 1}  # RGBImageField, IntField: what `convert ffcv` writes
    if any(dict(zip(names, types)).get(name) != t for name, t in wanted.items()):
        raise bad(f"fields {names}; lut-fast needs 'image' (RGBImageField) and 'label' (IntField)")
    if not descs_end < table <= size or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise bad(f"truncated: {size} bytes, its allocation table starts at byte {table}")
    allocations = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table)
    if num_samples == 0 or len(allocations) == 0:
        raise bad("no samples")
    if int((allocations["ptr"] + allocations["size"]).max()) > table:
        raise bad("truncated: sample data points past the end of the data")
