"""``lut-fast analyze``: attention distance, feature spectrum, attention maps (PNG + JSON into --out).

Each JSON also holds the run's full protocol (checkpoint sha256, settings, data fingerprint: ``records.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lut_fast.errors import UserError
from lut_fast.records import record_cli_result

analyze_app = typer.Typer(
    help="Analyse encoders: average attention distance, feature spectrum, attention maps.", no_args_is_help=True,
    add_completion=False,
)

CKPTS_HELP = "Checkpoints: lut-fast .pt, exported timm encoders or MAE-style {'model': ...} files."
DATA_HELP = "ImageFolder root with train/ and val/ (or one class-folder tree, split with --seed); default: the built-in dataset."


def _say(text: str) -> None:
    from rich.console import Console

    Console().print(text)


@analyze_app.command("attention-distance")
def attention_distance(
    ctx: typer.Context,
    ckpts: list[Path] = typer.Argument(..., help=CKPTS_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (attention_distance.json / .png)."),
    split: str = typer.Option("val", help="Images from train or val."),
    max_images: int = typer.Option(1000, help="At most this many images (a seeded sample; 0 = all)."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated names for the checkpoints  (default: run folder names)"),
    last: int = typer.Option(3, help="The table's summary column averages the last N layers."),
    renormalize: bool = typer.Option(True, "--renormalize/--no-renormalize", help="Renormalise each query's attention over the patches (cls excluded)."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Use the momentum (target) encoders."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, when a file has no config and the width is not a timm preset."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(2, help="Data loading processes."),
    seed: int = typer.Option(0, help="Seed of the image sample (and of a one-folder split)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Average attention distance (Eq. 4) per layer and head: table, JSON and a PNG comparing checkpoints."""
    from rich.console import Console
    from rich.table import Table

    from lut_fast.analysis.attention_distance import run_attention_distance

    if last < 1:
        raise UserError("--last must be >= 1")
    r = run_attention_distance(
        ckpts, data, out, split, max_images, labels, use_ema, num_heads, batch_size, workers,
        renormalize=renormalize, last_layers=last, seed=seed, device=device,
    )
    record_cli_result(ctx, out / "attention_distance.json", "analyze attention-distance", ckpts, data)
    from rich.markup import escape

    table = Table(title=escape(f"Average attention distance ({r['images']} {split} images; fraction of the image side, mean [min-max] over heads)"))
    table.add_column("layer", justify="right")
    for c in r["checkpoints"]:
        table.add_column(c["label"], justify="right")
    depth = max(len(c["aad"]) for c in r["checkpoints"])
    for i in range(depth):
        cells = []
        for c in r["checkpoints"]:
            if i < len(c["aad"]):
                heads = c["aad"][i]
                cells.append(escape(f"{sum(heads) / len(heads):.3f} [{min(heads):.3f}-{max(heads):.3f}]"))
            else:
                cells.append("")
        table.add_row(str(i + 1), *cells)
    table.add_row(f"last {last}", *[f"{c[f'last_{last}_layers_mean']:.3f}" for c in r["checkpoints"]])
    Console().print(table)
    _say(f"-> {out / 'attention_distance.json'}, {r['png']}")


@analyze_app.command("spectrum")
def spectrum(
    ctx: typer.Context,
    ckpts: list[Path] = typer.Argument(..., help="One checkpoint, or two to compare (the log-gap is CKPT2 minus CKPT)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (spectrum.json / .png)."),
    split: str = typer.Option("val", help="Images from train or val."),
    max_images: int = typer.Option(5000, help="At most this many images (a seeded sample; 0 = all)."),
    pool: str = typer.Option("mean", help="Per-image feature of each layer: mean of the patch tokens, or cls."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated names for the checkpoints  (default: run folder names)"),
    use_ema: bool = typer.Option(False, "--use-ema", help="Use the momentum (target) encoders."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, when a file has no config and the width is not a timm preset."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(2, help="Data loading processes."),
    seed: int = typer.Option(0, help="Seed of the image sample (and of a one-folder split)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Singular values of the feature covariance per layer; with two checkpoints, also their log-gap."""
    from lut_fast.analysis.spectrum import run_spectrum

    if pool not in ("mean", "cls"):
        raise UserError(f"--pool must be mean or cls, got {pool!r}")
    r = run_spectrum(ckpts, data, out, split, max_images, pool, labels, use_ema, num_heads, batch_size, workers, seed=seed, device=device)
    record_cli_result(ctx, out / "spectrum.json", "analyze spectrum", ckpts, data)
    import math

    for c in r["checkpoints"]:
        last = c["singular_values"][-1]
        _say(f"{c['label']}: last layer, ln sigma_1 = {math.log(max(last[0], 1e-12)):.2f}, sum of sigma = {sum(last):.3g}")
    if "log_gap" in r:
        gap = r["log_gap"][-1]
        _say(f"last layer mean log-gap ({r['log_gap_definition']}): {sum(gap) / len(gap):+.3f}")
    _say(f"-> {out / 'spectrum.json'}, {r['png']}")


@analyze_app.command("attention-maps")
def attention_maps(
    ctx: typer.Context,
    ckpts: list[Path] = typer.Argument(..., help=CKPTS_HELP + " Several: one row each."),
    image: Path = typer.Option(..., help="An image file (resized and center-cropped to the model's input)."),
    query: Optional[str] = typer.Option(None, help="Query patch X,Y: column,row (0-based) on the first checkpoint's patch grid  (default: the centre patch)"),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (attention_maps.png / .json)."),
    layer: int = typer.Option(-1, help="Block whose attention is shown (0-based; -1 = last)."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated names for the checkpoints  (default: run folder names)"),
    use_ema: bool = typer.Option(False, "--use-ema", help="Use the momentum (target) encoders."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, when a file has no config and the width is not a timm preset."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Each head's attention for one query patch, overlaid on the image; checkpoints side by side (PNG grid)."""
    from lut_fast.analysis.attention_maps import run_attention_maps

    r = run_attention_maps(ckpts, image, query, out, layer, labels, use_ema, num_heads, device)
    record_cli_result(ctx, r["json"], "analyze attention-maps", ckpts, image)
    _say(f"-> {r['png']}, {r['json']}")
