"""``lut-fast analyze``: attention distance, feature spectrum, attention maps (PNG + JSON into --out).

Each JSON also holds the run's full protocol (checkpoint sha256, settings, data fingerprint: ``records.py``).
Settings are typed as ``lut-fast eval``'s are (``evaluation/config.py``: ``--config``, flags, ``--set``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from lut_fast.evaluation.command import settings_command
from lut_fast.evaluation.config import AttentionDistanceConfig, AttentionMapsConfig, SpectrumConfig
from lut_fast.records import record_result

analyze_app = typer.Typer(
    help="Analyse encoders: average attention distance, feature spectrum, attention maps.", no_args_is_help=True,
    add_completion=False,
)

CKPTS_HELP = "Checkpoints: lut-fast .pt, exported timm encoders or MAE-style {'model': ...} files."


def _say(text: str) -> None:
    from rich.console import Console

    Console().print(text)


@settings_command(analyze_app, "attention-distance", AttentionDistanceConfig, label="analyze attention-distance",
                  helps={"seed": "seed of the image sample (and of a one-folder split)"})
def attention_distance(
    cfg: AttentionDistanceConfig,
    ckpts: list[Path] = typer.Argument(..., help=CKPTS_HELP),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (attention_distance.json / .png)."),
) -> None:
    """Average attention distance (Eq. 4) per layer and head: table, JSON and a PNG comparing checkpoints."""
    from rich.console import Console
    from rich.table import Table

    from lut_fast.analysis.attention_distance import run_attention_distance

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


@settings_command(analyze_app, "spectrum", SpectrumConfig, label="analyze spectrum", helps={"seed": "seed of the image sample (and of a one-folder split)"})
def spectrum(
    cfg: SpectrumConfig,
    ckpts: list[Path] = typer.Argument(..., help="One checkpoint, or two to compare (the log-gap is CKPT2 minus CKPT)."),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (spectrum.json / .png)."),
) -> None:
    """Singular values of the feature covariance per layer; with two checkpoints, also their log-gap."""
    from lut_fast.analysis.spectrum import run_spectrum

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


@settings_command(analyze_app, "attention-maps", AttentionMapsConfig, label="analyze attention-maps")
def attention_maps(
    cfg: AttentionMapsConfig,
    ckpts: list[Path] = typer.Argument(..., help=CKPTS_HELP + " Several: one row each."),
    out: Path = typer.Option(Path("runs/analysis"), help="Output folder (attention_maps.png / .json)."),
) -> None:
    """Each head's attention for one query patch, overlaid on the image; checkpoints side by side (PNG grid)."""
    from lut_fast.analysis.attention_maps import run_attention_maps

    r = run_attention_maps(ckpts, cfg, out)
    record_result(r["json"], "analyze attention-maps", ckpts, cfg, data_path=cfg.image)
    _say(f"-> {r['png']}, {r['json']}")
