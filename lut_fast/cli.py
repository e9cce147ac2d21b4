"""The ``lut-fast`` command line (typer).

Sub-commands live beside the code they drive and are mounted here:
train / data / export (this file), convert (``datasets/convert.py``),
bench (``bench/cli.py``), eval and analyze (``evaluation/cli.py``,
``analysis/cli.py``). A ``UserError`` anywhere becomes one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from lut_fast.errors import UserError

app = typer.Typer(
    name="lut-fast",
    help="High-throughput LUT / MAE pre-training of Vision Transformers.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Built-in dataset and data previews.", no_args_is_help=True)
export_app = typer.Typer(help="Export trained encoders.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")


def _default(key: str) -> str:
    """The default of a config field, read from the dataclasses (the single source of defaults)."""
    from lut_fast.config import TrainConfig

    node = TrainConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return f"(default: {node})"


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config; flags below override it."),
    method: Optional[str] = typer.Option(None, help="lut | mae " + _default("method")),
    model: Optional[str] = typer.Option(None, help="vit_tiny | vit_small | vit_base | vit_large " + _default("model.name")),
    img_size: Optional[int] = typer.Option(None, help="Input size in pixels " + _default("model.img_size")),
    patch_size: Optional[int] = typer.Option(None, help="Patch size " + _default("model.patch_size")),
    data: Optional[str] = typer.Option(None, help="ImageFolder tree, split root or converted data; empty = built-in dataset."),
    backend: Optional[str] = typer.Option(None, help="torch | dali | ffcv " + _default("data.backend")),
    batch_size: Optional[int] = typer.Option(None, help="Per-device batch size " + _default("optim.batch_size")),
    accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps " + _default("optim.accum_steps")),
    epochs: Optional[float] = typer.Option(None, help="Epochs " + _default("optim.epochs") + "; on --resume, a new length re-plans the schedule (see --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (the schedule is compressed to fit). "
                                            "On --resume, a new length re-plans the lr and momentum cosines to end there (warm-up kept)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: runs/<method>_<model>)"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.pt if it exists. May change: data, run "
                                "settings (not the seed), --max-steps/--epochs; model, method, batch and optimizer recipe are refused."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue from this checkpoint file "
                                               "(into its own run folder, or a new --out to branch)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start a new run from these weights: a lut-fast checkpoint, "
                                             "a `lut-fast export timm` file or an MAE-style file (prints what is loaded and what is fresh)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model " + _default("run.compile")),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp16 | fp32 " + _default("run.precision")),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda " + _default("run.device")),
    seed: Optional[int] = typer.Option(None, help="Random seed " + _default("run.seed")),
    max_hours: Optional[float] = typer.Option(None, help="Wall-clock budget in hours; ends cleanly with a checkpoint (default: none)"),
    set_: list[str] = typer.Option([], "--set", help="Any config field, repeatable: --set optim.blr=1e-4 --set model.depth=4 (see README: configuration)"),
) -> None:
    """Pre-train LUT (or the MAE baseline) and write config.yaml, metrics.jsonl and checkpoints/ to OUT."""
    from lut_fast.config import load_config
    from lut_fast.train import train as run_training

    flags = {
        "method": method, "model.name": model, "model.img_size": img_size, "model.patch_size": patch_size,
        "data.path": data, "data.backend": backend, "optim.batch_size": batch_size, "optim.accum_steps": accum,
        "optim.epochs": epochs, "optim.max_steps": max_steps, "run.out_dir": str(out) if out else None,
        "run.compile": compile, "run.precision": precision, "run.device": device, "run.seed": seed,
        "run.max_hours": max_hours,
    }
    if resume_from is not None and out is None:
        if resume_from.parent.name != "checkpoints":
            raise UserError(f"--resume-from {resume_from}: the file is not in a run's checkpoints/ folder; pass --out")
        flags["run.out_dir"] = str(resume_from.parent.parent)
    cfg = load_config(config, flags, set_)
    run_training(cfg, resume=resume, resume_from=resume_from, init_from=str(init_from) if init_from else None,
                 given_keys=_given_keys(config, flags, set_))


def _given_keys(config: Optional[Path], flags: dict, sets: list[str]) -> set[str]:
    """The config keys this command sets (YAML file, flags, --set): what a resume compares with the checkpoint."""
    import yaml

    keys = {k for k, v in flags.items() if v is not None} | {item.split("=", 1)[0].strip() for item in sets}
    if config is not None:
        def walk(tree: dict, prefix: str) -> None:
            for k, v in tree.items():
                walk(v, f"{prefix}{k}.") if isinstance(v, dict) else keys.add(prefix + k)

        walk(yaml.safe_load(Path(config).read_text()) or {}, "")
    return keys


@data_app.command("builtin")
def data_builtin(out_dir: Path = typer.Argument(..., help="Where to write train/<class>/*.jpg and val/<class>/*.jpg.")) -> None:
    """Write the built-in dataset (deterministic, generated locally) as an ImageFolder tree."""
    from rich.console import Console

    from lut_fast.datasets.builtin import CLASSES, write_builtin

    write_builtin(out_dir)
    n = sum(1 for _ in Path(out_dir).rglob("*.jpg"))
    Console().print(f"wrote {n} images in {len(CLASSES)} classes to [bold]{out_dir}[/] (train/ and val/)")


@data_app.command("preview")
def data_preview(
    backend: str = typer.Option("torch", help="torch | dali | ffcv"),
    data: Optional[str] = typer.Option(None, help="ImageFolder tree, .beton (ffcv) or DALI shard folder; empty = built-in dataset."),
    out: Path = typer.Option(Path("preview.png"), help="Output PNG."),
    method: str = typer.Option("lut", help="lut (view pairs) | mae (one view)"),
    img_size: int = typer.Option(224, help="View size in pixels."),
    samples: int = typer.Option(8, help="Samples in the grid."),
    seed: int = typer.Option(0, help="Random seed."),
    split: str = typer.Option("train", help="Split, when DATA holds train/ and val/."),
) -> None:
    """Write a PNG grid of the views a backend produces (view 1 | view 2 per sample), to check by eye."""
    from lut_fast.pipelines.preview import write_preview

    path = write_preview(backend, data, out, method=method, img_size=img_size, samples=samples, seed=seed, split=split)
    typer.echo(f"wrote {path}")


@export_app.command("timm")
def export_timm(
    ckpt: Path = typer.Argument(..., help="A lut-fast checkpoint (.pt)."),
    out: Path = typer.Argument(..., help="Output .pth: a state dict for timm.create_model('vit_<size>_patch16_224', num_classes=0)."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Export the momentum (target) encoder instead of the online one."),
) -> None:
    """Export the encoder so that timm loads it with strict=True."""
    from lut_fast.checkpoint import export_timm_encoder

    export_timm_encoder(ckpt, out, use_ema=use_ema)


# Sub-command groups that live beside the code they drive (their modules import only typer at the top).
from lut_fast.analysis.cli import analyze_app  # noqa: E402
from lut_fast.bench.cli import bench_app  # noqa: E402
from lut_fast.datasets.convert import convert_app  # noqa: E402
from lut_fast.evaluation.cli import eval_app  # noqa: E402

app.add_typer(convert_app, name="convert")
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
app.add_typer(analyze_app, name="analyze")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"lut-fast {version('lut-fast')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """High-throughput LUT / MAE pre-training of Vision Transformers."""


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"lut-fast: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("lut-fast: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
