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
    method: Optional[str] = typer.Option(None, help="lut | mae | simmim | lut_simmim " + _default("method")),
    model: Optional[str] = typer.Option(None, help="vit_tiny | vit_small | vit_base | vit_large " + _default("model.name")),
    img_size: Optional[int] = typer.Option(None, help="Input size in pixels " + _default("model.img_size")),
    patch_size: Optional[int] = typer.Option(None, help="Patch size " + _default("model.patch_size")),
    data: Optional[str] = typer.Option(None, help="ImageFolder tree, split root or converted data; empty = built-in dataset."),
    backend: Optional[str] = typer.Option(None, help="torch | dali | ffcv " + _default("data.backend")),
    batch_size: Optional[int] = typer.Option(None, help="Per-device batch size " + _default("optim.batch_size")),
    accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps " + _default("optim.accum_steps")),
    epochs: Optional[float] = typer.Option(None, help="Epochs " + _default("optim.epochs")
                                                 + "; on --resume, a new length re-plans the schedule (see --max-steps)."),
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
    wandb: Optional[bool] = typer.Option(None, "--wandb", help="Also log to Weights & Biases "
                                                                   "(pip install 'lut-fast[wandb]'; WANDB_MODE=offline works without network)."),
    set_: list[str] = typer.Option([], "--set", help="Any config field, repeatable: --set optim.blr=1e-4 --set model.depth=4 (see README: configuration)"),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config (each value with where it came from) "
                                                                         "and exit without training."),
) -> None:
    """Pre-train LUT (or the MAE baseline) and write config.yaml, metrics.jsonl and checkpoints/ to OUT."""
    from lut_fast.config import is_user_source, load_config
    from lut_fast.train import train as run_training

    flags = {
        "method": method, "model.name": model, "model.img_size": img_size, "model.patch_size": patch_size,
        "data.path": data, "data.backend": backend, "optim.batch_size": batch_size, "optim.accum_steps": accum,
        "optim.epochs": epochs, "optim.max_steps": max_steps, "run.out_dir": str(out) if out else None,
        "run.compile": compile, "run.precision": precision, "run.device": device, "run.seed": seed,
        "run.max_hours": max_hours, "run.wandb": wandb,
    }
    if resume_from is not None and out is None:
        if resume_from.parent.name != "checkpoints":
            raise UserError(f"--resume-from {resume_from}: the file is not in a run's checkpoints/ folder; pass --out")
        flags["run.out_dir"] = str(resume_from.parent.parent)
    # Flags whose name is not "--" + the key's last part (for "where each value came from").
    flag_names = {"model.name": "--model", "data.path": "--data", "optim.accum_steps": "--accum", "run.out_dir": "--out"}
    cfg = load_config(config, flags, set_, flag_names, cpu_recipe=True)
    if print_config:
        import os

        from lut_fast.config import format_resolved

        typer.echo(format_resolved(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1"))), nl=False)
        return
    # What a resume compares with the checkpoint: the keys this command set (YAML file, flags, --set).
    given_keys = {key for key, source in cfg.sources.items() if is_user_source(source)}
    run_training(cfg, resume=resume, resume_from=resume_from, init_from=str(init_from) if init_from else None,
                 given_keys=given_keys)


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
    out: Path = typer.Argument(..., help="Output .pth: a state dict; the command prints the timm.create_model(...) call that loads it."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Export the momentum (target) encoder instead of the online one."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Export the encoder so that timm loads it with strict=True, and print the line that builds the model."""
    from lut_fast.checkpoint import export_timm_state, timm_create_model_call

    path, arch = export_timm_state(ckpt, out, use_ema=use_ema, overwrite=overwrite)
    typer.echo(f"wrote {path}; load it with:")
    typer.echo(f"  model = {timm_create_model_call(arch)}")
    typer.echo(f'  model.load_state_dict(torch.load("{path}", map_location="cpu"), strict=True)')


@export_app.command("mmseg")
def export_mmseg(
    ckpt: Path = typer.Argument(..., help="A lut-fast checkpoint (.pt), a `lut-fast export timm` file or an MAE-style file."),
    out: Path = typer.Argument(..., help="Output .pth; the command prints the mmseg config lines that load it."),
    img_size: int = typer.Option(512, "--img-size", help="Segmentation crop size in pixels; pos_embed is resized (bicubic) to its grid."),
    layout: str = typer.Option("mmseg-mae", help="mmseg-mae (mmseg's MAE backbone) | mmseg-vit (its VisionTransformer) | "
                               "mae (MAE's released-checkpoint layout, {'model': ...})."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Export the momentum (target) encoder instead of the online one."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Export the encoder for semantic segmentation (mmsegmentation; README: "Segmentation (ADE20K)")."""
    from lut_fast.export_seg import backbone_config, export_segmentation

    result = export_segmentation(ckpt, out, layout=layout, img_size=img_size, use_ema=use_ema, overwrite=overwrite)
    typer.echo(f"wrote {result.path} ({result.layout}; pos_embed {result.source_grid}x{result.source_grid} -> "
               f"{result.grid}x{result.grid})")
    typer.echo(backbone_config(result))


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (each with metrics.jsonl); several share one figure."),
    out: Optional[Path] = typer.Option(None, help="Output PNG  (default: RUN/curves.png for one run, curves.png here for several)"),
    labels: Optional[str] = typer.Option(None, help="Comma-separated names for the runs  (default: folder (method))"),
) -> None:
    """Training curves as a PNG: loss terms, lr/momentum, throughput, online k-NN over steps."""
    from lut_fast.plot import plot_runs

    target = out or (runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png"))
    names = [x.strip() for x in labels.split(",")] if labels else None
    typer.echo(f"wrote {plot_runs(runs, target, names)}")


@app.command()
def report(
    items: list[Path] = typer.Argument(..., help="Run folders (metrics.jsonl, eval/*/...json) and/or result JSON files of eval / analyze."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table instead of the terminal table."),
) -> None:
    """One table across runs: steps, final loss, online k-NN, k-NN / linear / fine-tune top-1, attention distance per layer."""
    from lut_fast.report import collect_rows, print_table, to_markdown

    rows = collect_rows(items)
    if markdown:
        typer.echo(to_markdown(rows))
    else:
        print_table(rows)


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
