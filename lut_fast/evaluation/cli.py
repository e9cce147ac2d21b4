"""``lut-fast eval``: k-NN, linear probing and fine-tuning of a pre-trained encoder.

Every command accepts lut-fast checkpoints (online encoder, or the momentum
one with ``--use-ema`` where it applies), ``lut-fast export timm`` files and
official-MAE-style checkpoints (``{"model": {...}}``, encoder keys only).
Results are JSON files written atomically into ``--out``, each with its
full protocol (checkpoint sha256, settings, data fingerprint: ``records.py``).

Settings are typed (``evaluation/config.py``): defaults <- ``--config FILE`` (YAML, or an earlier
result JSON) <- flags <- ``--set key=value``; ``--print-config`` shows them and where each came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lut_fast.errors import UserError
from lut_fast.evaluation.config import FinetuneConfig, KnnConfig, LinearConfig, format_settings, load_command_config, option
from lut_fast.records import record_result

eval_app = typer.Typer(
    help="Evaluate a pre-trained encoder: k-NN, linear probe, fine-tuning.", no_args_is_help=True, add_completion=False,
)

CKPT_HELP = "Checkpoint: lut-fast .pt, an exported timm encoder, or an MAE-style {'model': ...} file."
CONFIG_HELP = "Settings file: YAML of this command's settings, or an earlier result JSON (its protocol.config)."
SET_HELP = "Override one setting: key=value (YAML value), repeatable; applied after the flags."
PRINT_HELP = "Print the resolved settings (and where each came from), then exit."


# The three options every command with typed settings has (functions: a fresh option per command).
def config_option():
    return typer.Option(None, "--config", help=CONFIG_HELP)


def set_option():
    return typer.Option(None, "--set", help=SET_HELP)


def print_option():
    return typer.Option(False, "--print-config", help=PRINT_HELP)


def resolve_settings(cls, command: str, config: Optional[Path], sets: Optional[list[str]], print_config: bool, **flags):
    """The command's typed settings; with --print-config, prints them and ends the command (exit 0)."""
    cfg = load_command_config(cls, config, flags, sets)
    if print_config:
        typer.echo(format_settings(cfg, command), nl=False)
        raise typer.Exit(0)
    return cfg


def _out(out: Optional[Path], ckpt: Path, what: str) -> Path:
    from lut_fast.evaluation.common import default_out

    if not ckpt.is_file():
        raise UserError(f"checkpoint not found: {ckpt}")
    return out if out is not None else default_out(ckpt, what)


def _say(text: str) -> None:
    from rich.console import Console

    Console().print(text)


@eval_app.command("knn")
def knn(
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    out: Optional[Path] = typer.Option(None, help="Results folder  (default: <run>/eval/knn)"),
    data: Optional[str] = option(KnnConfig, "data"),
    k: Optional[int] = option(KnnConfig, "k", "--k"),
    temperature: Optional[float] = option(KnnConfig, "temperature"),
    pool: Optional[str] = option(KnnConfig, "pool"),
    use_ema: Optional[bool] = option(KnnConfig, "use_ema", "--use-ema"),
    random_init: Optional[bool] = option(KnnConfig, "random_init", "--random-init"),
    num_heads: Optional[int] = option(KnnConfig, "num_heads"),
    batch_size: Optional[int] = option(KnnConfig, "batch_size"),
    workers: Optional[int] = option(KnnConfig, "workers"),
    crop_pct: Optional[float] = option(KnnConfig, "crop_pct"),
    val_fraction: Optional[float] = option(KnnConfig, "val_fraction"),
    seed: Optional[int] = option(KnnConfig, "seed"),
    device: Optional[str] = option(KnnConfig, "device"),
    cache: Optional[bool] = option(KnnConfig, "cache", "--cache/--no-cache"),
    config: Optional[Path] = config_option(),
    sets: Optional[list[str]] = set_option(),
    print_config: bool = print_option(),
) -> None:
    """Frozen-encoder k-NN accuracy (cosine similarity, temperature-weighted votes)."""
    from lut_fast.evaluation.knn import run_knn

    cfg = resolve_settings(
        KnnConfig, "eval knn", config, sets, print_config, data=data, k=k, temperature=temperature, pool=pool,
        use_ema=use_ema, random_init=random_init, num_heads=num_heads, batch_size=batch_size, workers=workers,
        crop_pct=crop_pct, val_fraction=val_fraction, seed=seed, device=device, cache=cache,
    )
    out = _out(out, ckpt, "knn")
    r = run_knn(ckpt, cfg, out)
    record_result(out / "knn.json", "eval knn", [ckpt], cfg)
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    _say(f"k-NN (k={cfg.k}, T={cfg.temperature}, {cfg.pool}): top-1 [bold]{r['top1']:.2f}%[/]{top5}  ->  {out / 'knn.json'}")


def _refuse_torchrun(command: str) -> None:
    """Linear probing and fine-tuning run in one process: N torchrun processes would train N copies into one folder."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise UserError(
            f"eval {command} runs in a single process (one GPU or the CPU), not under torchrun ({world} processes here "
            f"would train {world} independent copies into one folder): run `lut-fast eval {command} ...` directly"
        )


@eval_app.command("linear")
def linear(
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    out: Optional[Path] = typer.Option(None, help="Results folder  (default: <run>/eval/linear)"),
    data: Optional[str] = option(LinearConfig, "data"),
    epochs: Optional[int] = option(LinearConfig, "epochs"),
    batch_size: Optional[int] = option(LinearConfig, "batch_size"),
    optimizer: Optional[str] = option(LinearConfig, "optimizer"),
    blr: Optional[float] = option(LinearConfig, "blr"),
    weight_decay: Optional[float] = option(LinearConfig, "weight_decay"),
    warmup_epochs: Optional[float] = option(LinearConfig, "warmup_epochs"),
    pool: Optional[str] = option(LinearConfig, "pool"),
    use_ema: Optional[bool] = option(LinearConfig, "use_ema", "--use-ema"),
    random_init: Optional[bool] = option(LinearConfig, "random_init", "--random-init"),
    num_heads: Optional[int] = option(LinearConfig, "num_heads"),
    feature_batch_size: Optional[int] = option(LinearConfig, "feature_batch_size"),
    workers: Optional[int] = option(LinearConfig, "workers"),
    crop_pct: Optional[float] = option(LinearConfig, "crop_pct"),
    val_fraction: Optional[float] = option(LinearConfig, "val_fraction"),
    seed: Optional[int] = option(LinearConfig, "seed", help="seed of the split, the head's init and the batch order"),
    device: Optional[str] = option(LinearConfig, "device"),
    cache: Optional[bool] = option(LinearConfig, "cache", "--cache/--no-cache"),
    config: Optional[Path] = config_option(),
    sets: Optional[list[str]] = set_option(),
    print_config: bool = print_option(),
) -> None:
    """Linear probe (MAE protocol): frozen encoder, BatchNorm without affine + Linear, on cached features."""
    from lut_fast.evaluation.linear import run_linear

    cfg = resolve_settings(
        LinearConfig, "eval linear", config, sets, print_config, data=data, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer, blr=blr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, pool=pool,
        use_ema=use_ema, random_init=random_init, num_heads=num_heads, feature_batch_size=feature_batch_size,
        workers=workers, crop_pct=crop_pct, val_fraction=val_fraction, seed=seed, device=device, cache=cache,
    )
    _refuse_torchrun("linear")
    out = _out(out, ckpt, "linear")
    r = run_linear(ckpt, cfg, out)
    record_result(out / "linear.json", "eval linear", [ckpt], cfg)
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    _say(f"linear probe ({cfg.epochs} epochs, {cfg.pool}): top-1 [bold]{r['top1']:.2f}%[/]{top5} (best {r['best_top1']:.2f}%)  ->  {out / 'linear.json'}")


@eval_app.command("finetune")
def finetune(
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    out: Optional[Path] = typer.Option(None, help="Results and model folder  (default: <run>/eval/finetune)"),
    data: Optional[str] = option(FinetuneConfig, "data"),
    backend: Optional[str] = option(FinetuneConfig, "backend"),
    train_data: Optional[str] = option(FinetuneConfig, "train_data"),
    epochs: Optional[float] = option(FinetuneConfig, "epochs"),
    max_steps: Optional[int] = option(FinetuneConfig, "max_steps"),
    batch_size: Optional[int] = option(FinetuneConfig, "batch_size"),
    accum: Optional[int] = option(FinetuneConfig, "accum"),
    blr: Optional[float] = option(FinetuneConfig, "blr"),
    lr: Optional[float] = option(FinetuneConfig, "lr"),
    lr_scaling: Optional[str] = option(FinetuneConfig, "lr_scaling"),
    layer_decay: Optional[float] = option(FinetuneConfig, "layer_decay"),
    weight_decay: Optional[float] = option(FinetuneConfig, "weight_decay"),
    min_lr: Optional[float] = option(FinetuneConfig, "min_lr"),
    warmup_epochs: Optional[float] = option(FinetuneConfig, "warmup_epochs"),
    drop_path: Optional[float] = option(FinetuneConfig, "drop_path"),
    smoothing: Optional[float] = option(FinetuneConfig, "smoothing"),
    mixup: Optional[float] = option(FinetuneConfig, "mixup"),
    cutmix: Optional[float] = option(FinetuneConfig, "cutmix"),
    randaug: Optional[str] = option(FinetuneConfig, "randaug"),
    reprob: Optional[float] = option(FinetuneConfig, "reprob"),
    clip_grad: Optional[float] = option(FinetuneConfig, "clip_grad"),
    pool: Optional[str] = option(FinetuneConfig, "pool"),
    use_ema: Optional[bool] = option(FinetuneConfig, "use_ema", "--use-ema"),
    num_heads: Optional[int] = option(FinetuneConfig, "num_heads"),
    workers: Optional[int] = option(FinetuneConfig, "workers", help="data loading processes (and RandAugment threads)"),
    eval_every: Optional[int] = option(FinetuneConfig, "eval_every"),
    crop_pct: Optional[float] = option(FinetuneConfig, "crop_pct"),
    val_fraction: Optional[float] = option(FinetuneConfig, "val_fraction"),
    seed: Optional[int] = option(FinetuneConfig, "seed"),
    device: Optional[str] = option(FinetuneConfig, "device"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/finetune_state.pt (saved after every epoch; same settings)."),
    config: Optional[Path] = config_option(),
    sets: Optional[list[str]] = set_option(),
    print_config: bool = print_option(),
) -> None:
    """End-to-end fine-tuning with the paper's Table D recipe; writes the fine-tuned model and top-1/top-5."""
    from lut_fast.evaluation.finetune import run_finetune

    cfg = resolve_settings(
        FinetuneConfig, "eval finetune", config, sets, print_config, data=data, backend=backend, train_data=train_data,
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, accum=accum, blr=blr, lr=lr, lr_scaling=lr_scaling,
        layer_decay=layer_decay, weight_decay=weight_decay, min_lr=min_lr, warmup_epochs=warmup_epochs,
        drop_path=drop_path, smoothing=smoothing, mixup=mixup, cutmix=cutmix, randaug=randaug, reprob=reprob,
        clip_grad=clip_grad, pool=pool, use_ema=use_ema, num_heads=num_heads, workers=workers, eval_every=eval_every,
        crop_pct=crop_pct, val_fraction=val_fraction, seed=seed, device=device,
    )
    _refuse_torchrun("finetune")
    out = _out(out, ckpt, "finetune")
    r = run_finetune(ckpt, cfg, out, resume=resume)
    record_result(out / "finetune.json", "eval finetune", [ckpt], cfg, {"resume": resume}, train_data=cfg.train_data)
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    _say(f"fine-tuned {r['steps']} steps: top-1 [bold]{r['top1']:.2f}%[/]{top5}  ->  {out / 'finetune.json'}, {out / 'finetuned.pt'}")
