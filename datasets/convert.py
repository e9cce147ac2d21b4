"""``lut-fast convert ffcv|dali|folder``: turn an ImageFolder tree into a backend's storage.

Thin command-line wrappers; the work is in ``ffcv_writer.py``,
``dali_writer.py`` and ``folder_writer.py`` (the torch backend's: an
ImageFolder of JPEGs). ``--shorter-side S`` stores every image with its
shorter side at S (the SRC resize done once, offline): what makes LUT's views
cheap. All print a progress bar, list skipped files and end with a one-line
summary (images, classes, bytes, seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

convert_app = typer.Typer(
    help="Convert an ImageFolder tree to FFCV (.beton), DALI (webdataset tar shards) or, for the torch backend, "
         "an ImageFolder stored at a smaller size.", no_args_is_help=True
)

_SRC = typer.Argument(..., help="ImageFolder tree (<class>/<image>) or a split root holding train/ and val/.")
_SPLIT = typer.Option("train", help="Split to convert when SRC_DIR holds train/ and val/.")
_WORKERS = typer.Option(0, help="Worker processes (0 = all cores).")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output.")
_SHORTER_SIDE_HELP = (
    "Shrink each image once, here, so its shorter side is S (bicubic, antialiased; smaller images kept). "
    "For LUT's views (SRC resizes the shorter side to the image size): with S = the training image size "
    "training skips the resize, and the views are exact up to JPEG re-encoding. MAE's RandomResizedCrop "
    "zooms into crops and needs more pixels: keep a larger S (e.g. 2x the image size) or the originals. "
    "Recorded in the output's metadata; training warns when the stored size cannot serve the recipe."
)
_SHORTER_SIDE = typer.Option(None, "--shorter-side", metavar="S", help=_SHORTER_SIDE_HELP)


@convert_app.command("ffcv")
def convert_ffcv(
    src_dir: Path = _SRC,
    out: Path = typer.Argument(..., help="Output .beton file."),
    split: str = _SPLIT,
    max_resolution: Optional[int] = typer.Option(512, help="Cap on the longer side (ffcv-imagenet: 256-512); 0 = keep."),
    jpeg_quality: int = typer.Option(90, help="JPEG quality for compressed images."),
    write_mode: str = typer.Option("jpg", help="jpg | raw | proportion | smart"),
    compress_probability: float = typer.Option(0.5, help="Share of images stored as JPEG with --write-mode proportion."),
    smart_threshold: Optional[int] = typer.Option(
        None, help="--write-mode smart: JPEG-compress images above this many raw bytes."
    ),
    workers: int = _WORKERS,
    chunk_size: int = typer.Option(100, help="Images per work item handed to a writer process."),
    overwrite: bool = _OVERWRITE,
    shorter_side: Optional[int] = _SHORTER_SIDE,
) -> None:
    """Write SRC_DIR's images and labels to an FFCV .beton (train with --backend ffcv --data OUT)."""
    from lut_fast.errors import UserError

    from .ffcv_writer import write_beton

    if out.suffix != ".beton":
        raise UserError(f"the FFCV output should end in .beton, got {out}")
    report = write_beton(
        src_dir, out, split=split, max_resolution=max_resolution or None, jpeg_quality=jpeg_quality,
        write_mode=write_mode, compress_probability=compress_probability, smart_threshold=smart_threshold,
        workers=workers, chunk_size=chunk_size, overwrite=overwrite, shorter_side=shorter_side,
    )
    report.print()


@convert_app.command("dali")
def convert_dali(
    src_dir: Path = _SRC,
    out_dir: Path = typer.Argument(..., help="Output folder for the tar shards, index files and classes.json."),
    split: str = _SPLIT,
    shard_size: int = typer.Option(1000, help="Images per tar shard."),
    max_resolution: Optional[int] = typer.Option(None, help="Cap on the longer side (re-encodes larger images); default: keep."),
    jpeg_quality: int = typer.Option(95, help="JPEG quality for images that must be re-encoded (PNG, CMYK, gray, resized)."),
    workers: int = _WORKERS,
    seed: int = typer.Option(0, help="Seed of the stored sample order (shuffled, so shards mix classes)."),
    overwrite: bool = _OVERWRITE,
    shorter_side: Optional[int] = _SHORTER_SIDE,
) -> None:
    """Write SRC_DIR as webdataset tar shards with DALI index files (train with --backend dali --data OUT_DIR)."""
    from .dali_writer import write_shards

    report = write_shards(
        src_dir, out_dir, split=split, shard_size=shard_size, max_resolution=max_resolution or None,
        jpeg_quality=jpeg_quality, workers=workers, seed=seed, overwrite=overwrite, shorter_side=shorter_side,
    )
    report.print()


@convert_app.command("folder")
def convert_folder(
    src_dir: Path = _SRC,
    out_dir: Path = typer.Argument(..., help="Output folder for one split: <class>/<image>.jpg and its metadata "
                                             "(name it ROOT/train, and ROOT/val with --split val, to pass --data ROOT)."),
    shorter_side: int = typer.Option(..., "--shorter-side", metavar="S", help=_SHORTER_SIDE_HELP),
    split: str = _SPLIT,
    max_resolution: Optional[int] = typer.Option(None, help="Cap on the longer side after the shrink; default: keep."),
    jpeg_quality: int = typer.Option(90, help="JPEG quality for images that must be re-encoded (resized, PNG, CMYK, gray)."),
    workers: int = _WORKERS,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Write SRC_DIR as an ImageFolder of JPEGs with the shorter side at most S, for the torch backend
    (train with --backend torch --data OUT_DIR): RGB JPEGs already small enough are copied as they are."""
    from .folder_writer import write_folder

    report = write_folder(src_dir, out_dir, shorter_side, split=split, max_resolution=max_resolution or None,
                          jpeg_quality=jpeg_quality, workers=workers, overwrite=overwrite)
    report.print()
