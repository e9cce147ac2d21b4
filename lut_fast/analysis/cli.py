"""``lut-fast analyze``: attention distance, feature spectrum, attention maps (PNG + JSON into --out).

Each JSON also holds the run's full protocol (checkpoint sha256, settings, data fingerprint: ``records.py``).
Settings are typed as ``lut-fast eval``'s are (``evaluation/config.py``: ``--config``, flags, ``--set``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lut_fast.evaluation.cli import config_option, print_option, resolve_settings, set_option
from lut_fast.evaluation.config import AttentionDistanceConfig, AttentionMapsConfig, SpectrumConfig, option
from lut_fast.records import record_result

analyze_app = typer.Typer(
    help="Analyse encoders: average attention distance, feature spectrum, attention maps.", no_args_is_help=True,
    add_completion=False,
)

CKPTS_HELP = "Checkpoints: lut-fast .pt, exported timm encoders or MAE-style {'model': ...} files."


def _say(text: str) -> None:
    from rich.console import Console

    Console().print(text)


@analyze_app.command("attention-distance")
def attention_distance(
    ckpts: list[Path] = typer.Argument(..., help=CKPTS_HELP),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (attention_distance.json / .png)."),
    data: Optional[str] = option(AttentionDistanceConfig, "data"),
    split: Optional[str] = option(AttentionDistanceConfig, "split"),
    max_images: Optional[int] = option(AttentionDistanceConfig, "max_images"),
    labels: Optional[str] = option(AttentionDistanceConfig, "labels"),
    last: Optional[int] = option(AttentionDistanceConfig, "last"),
    renormalize: Optional[bool] = option(AttentionDistanceConfig, "renormalize", "--renormalize/--no-renormalize"),
    use_ema: Optional[bool] = option(AttentionDistanceConfig, "use_ema", "--use-ema"),
    num_heads: Optional[int] = option(AttentionDistanceConfig, "num_heads"),
    batch_size: Optional[int] = option(AttentionDistanceConfig, "batch_size"),
    workers: Optional[int] = option(AttentionDistanceConfig, "workers"),
    seed: Optional[int] = option(AttentionDistanceConfig, "seed", help="seed of the image sample (and of a one-folder split)"),
    device: Optional[str] = option(AttentionDistanceConfig, "device"),
    config: Optional[Path] = config_option(),
    sets: Optional[list[str]] = set_option(),
    print_config: bool = print_option(),
) -> None:
    """Average attention distance (Eq. 4) per layer and head: table, JSON and a PNG comparing checkpoints."""
    from rich.console import Console
    from rich.table import Table

    from lut_fast.analysis.attention_distance import run_attention_distance

    cfg = resolve_settings(
        AttentionDistanceConfig, "analyze attention-distance", config, sets, print_config, data=data, split=split,
        max_images=max_images, labels=labels, last=last, renormalize=renormalize, use_ema=use_ema, num_heads=num_heads,
        batch_size=batch_size, workers=workers, seed=seed, device=device,
    )
    r = run_attention_distance(ckpts, cfg, out)
    record_result(out / "attention_distance.json", "analyze attention-distance", ckpts, cfg)
    from rich.markup import escape

    last = cfg.last
    table = Table(title=escape(f"Average attention distance ({r['images']} {cfg.split} images; fraction of the image side, mean [min-max] over heads)"))
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
    ckpts: list[Path] = typer.Argument(..., help="One checkpoint, or two to compare (the log-gap is CKPT2 minus CKPT)."),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (spectrum.json / .png)."),
    data: Optional[str] = option(SpectrumConfig, "data"),
    split: Optional[str] = option(SpectrumConfig, "split"),
    max_images: Optional[int] = option(SpectrumConfig, "max_images"),
    pool: Optional[str] = option(SpectrumConfig, "pool"),
    labels: Optional[str] = option(SpectrumConfig, "labels"),
    use_ema: Optional[bool] = option(SpectrumConfig, "use_ema", "--use-ema"),
    num_heads: Optional[int] = option(SpectrumConfig, "num_heads"),
    batch_size: Optional[int] = option(SpectrumConfig, "batch_size"),
    workers: Optional[int] = option(SpectrumConfig, "workers"),
    seed: Optional[int] = option(SpectrumConfig, "seed", help="seed of the image sample (and of a one-folder split)"),
    device: Optional[str] = option(SpectrumConfig, "device"),
    config: Optional[Path] = config_option(),
    sets: Optional[list[str]] = set_option(),
    print_config: bool = print_option(),
) -> None:
    """Singular values of the feature covariance per layer; with two checkpoints, also their log-gap."""
    from lut_fast.analysis.spectrum import run_spectrum

    cfg = resolve_settings(
        SpectrumConfig, "analyze spectrum", config, sets, print_config, data=data, split=split, max_images=max_images,
        pool=pool, labels=labels, use_ema=use_ema, num_heads=num_heads, batch_size=batch_size, workers=workers,
        seed=seed, device=device,
    )
    r = run_spectrum(ckpts, cfg, out)
    record_result(out / "spectrum.json", "analyze spectrum", ckpts, cfg)
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
    ckpts: list[Path] = typer.Argument(..., help=CKPTS_HELP + " Several: one row each."),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (attention_maps.png / .json)."),
    image: Optional[str] = option(AttentionMapsConfig, "image"),
    query: Optional[str] = option(AttentionMapsConfig, "query"),
    layer: Optional[int] = option(AttentionMapsConfig, "layer"),
    labels: Optional[str] = option(AttentionMapsConfig, "labels"),
    use_ema: Optional[bool] = option(AttentionMapsConfig, "use_ema", "--use-ema"),
    num_heads: Optional[int] = option(AttentionMapsConfig, "num_heads"),
    device: Optional[str] = option(AttentionMapsConfig, "device"),
    config: Optional[Path] = config_option(),
    sets: Optional[list[str]] = set_option(),
    print_config: bool = print_option(),
) -> None:
    """Each head's attention for one query patch, overlaid on the image; checkpoints side by side (PNG grid)."""
    from lut_fast.analysis.attention_maps import run_attention_maps

    cfg = resolve_settings(
        AttentionMapsConfig, "analyze attention-maps", config, sets, print_config, image=image, query=query,
        layer=layer, labels=labels, use_ema=use_ema, num_heads=num_heads, device=device,
    )
    r = run_attention_maps(ckpts, cfg, out)
    record_result(r["json"], "analyze attention-maps", ckpts, cfg, data_path=cfg.image)
    _say(f"-> {r['png']}, {r['json']}")
