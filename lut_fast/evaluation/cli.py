"""``lut-fast eval``: k-NN, linear probing and fine-tuning of a pre-trained encoder.

Every command accepts lut-fast checkpoints (online encoder, or the momentum
one with ``--use-ema`` where it applies), ``lut-fast export timm`` files and
official-MAE-style checkpoints (``{"model": {...}}``, encoder keys only).
Results are JSON files written atomically into ``--out``, each with its
full protocol (checkpoint sha256, settings, data fingerprint: ``records.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lut_fast.errors import UserError
from lut_fast.records import record_cli_result

eval_app = typer.Typer(
    help="Evaluate a pre-trained encoder: k-NN, linear probe, fine-tuning; robustness of the classifiers they give.", no_args_is_help=True, add_completion=False,
)

CKPT_HELP = "Checkpoint: lut-fast .pt, an exported timm encoder, or an MAE-style {'model': ...} file."
DATA_HELP = "ImageFolder root with train/ and val/ (or one class-folder tree, split per class with --seed); default: the built-in dataset."


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UserError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


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
    ctx: typer.Context,
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    out: Optional[Path] = typer.Option(None, help="Results folder  (default: <run>/eval/knn)"),
    k: int = typer.Option(20, "--k", help="Neighbours that vote."),
    temperature: float = typer.Option(0.07, help="Vote weight exp(cosine / T)."),
    pool: str = typer.Option("cls", help="Feature: the cls token (DINO / MAE protocol) or mean (of the patch tokens, LUT's pooling)."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Use the momentum (target) encoder of a lut-fast checkpoint."),
    random_init: bool = typer.Option(False, "--random-init", help="Baseline: the checkpoint's architecture with random weights."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, when the file has no config and the width is not a timm preset."),
    batch_size: int = typer.Option(128, help="Images per forward pass."),
    workers: int = typer.Option(2, help="Data loading processes."),
    crop_pct: float = typer.Option(0.875, help="Center-crop fraction (resize to size / crop_pct, then crop)."),
    val_fraction: float = typer.Option(0.2, help="Val share per class when --data has no train/ and val/."),
    seed: int = typer.Option(0, help="Seed of that split."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Keep features in OUT/cache for later runs."),
) -> None:
    """Frozen-encoder k-NN accuracy (cosine similarity, temperature-weighted votes)."""
    from lut_fast.evaluation.knn import run_knn

    out = _out(out, ckpt, "knn")
    r = run_knn(
        ckpt, data, out, k, temperature, _choice(pool, ("mean", "cls"), "--pool"), use_ema, random_init, num_heads,
        batch_size, workers, crop_pct, val_fraction, seed, device, cache,
    )
    record_cli_result(ctx, out / "knn.json", "eval knn", [ckpt], data)
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    _say(f"k-NN (k={k}, T={temperature}, {pool}): top-1 [bold]{r['top1']:.2f}%[/]{top5}  ->  {out / 'knn.json'}")


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
    ctx: typer.Context,
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    out: Optional[Path] = typer.Option(None, help="Results folder  (default: <run>/eval/linear)"),
    epochs: int = typer.Option(90, help="Epochs over the cached features (MAE: 90)."),
    batch_size: int = typer.Option(256, help="Batch size of the head's training."),
    optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9) | lars (MAE's ImageNet setting, needs large batches)."),
    blr: float = typer.Option(0.1, help="Base lr; lr = blr * batch / 256."),
    weight_decay: float = typer.Option(0.0, help="Weight decay of the head."),
    warmup_epochs: float = typer.Option(10, help="Linear warm-up epochs, then cosine."),
    pool: str = typer.Option("cls", help="Feature: the cls token (DINO / MAE protocol) or mean (of the patch tokens, LUT's pooling)."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Use the momentum (target) encoder of a lut-fast checkpoint."),
    random_init: bool = typer.Option(False, "--random-init", help="Baseline: the checkpoint's architecture with random weights."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, when the file has no config and the width is not a timm preset."),
    feature_batch_size: int = typer.Option(128, help="Images per forward pass while computing features."),
    workers: int = typer.Option(2, help="Data loading processes."),
    crop_pct: float = typer.Option(0.875, help="Center-crop fraction."),
    val_fraction: float = typer.Option(0.2, help="Val share per class when --data has no train/ and val/."),
    seed: int = typer.Option(0, help="Seed of the split, the head's init and the batch order."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Keep features in OUT/cache for later runs."),
) -> None:
    """Linear probe (MAE protocol): frozen encoder, BatchNorm without affine + Linear, on cached features."""
    from lut_fast.evaluation.linear import OPTIMIZERS, run_linear

    _refuse_torchrun("linear")
    out = _out(out, ckpt, "linear")
    r = run_linear(
        ckpt, data, out, epochs, batch_size, _choice(optimizer, OPTIMIZERS, "--optimizer"), blr, weight_decay,
        warmup_epochs, _choice(pool, ("mean", "cls"), "--pool"), use_ema, random_init, num_heads, feature_batch_size,
        workers, crop_pct, val_fraction, seed, device, cache,
    )
    record_cli_result(ctx, out / "linear.json", "eval linear", [ckpt], data)
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    _say(f"linear probe ({epochs} epochs, {pool}): top-1 [bold]{r['top1']:.2f}%[/]{top5} (best {r['best_top1']:.2f}%)  ->  {out / 'linear.json'}")


@eval_app.command("finetune")
def finetune(
    ctx: typer.Context,
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    out: Optional[Path] = typer.Option(None, help="Results and model folder  (default: <run>/eval/finetune)"),
    backend: str = typer.Option("torch", help="Training-view pipeline: torch | dali | ffcv."),
    train_data: Optional[str] = typer.Option(None, help="Training data for the backend (e.g. a converted train split)  (default: --data)"),
    epochs: Optional[float] = typer.Option(None, help="Epochs  (default: Table D: 300 (Ti/S), 100 (B), 50 (L))"),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (the schedule is compressed to fit)."),
    batch_size: int = typer.Option(64, help="Batch size per step (Table D: 1024 in total; use --accum)."),
    accum: int = typer.Option(1, help="Gradient accumulation steps."),
    blr: Optional[float] = typer.Option(None, help="Base lr  (default: Table D: 5e-4 (Ti/S), 2.5e-4 (B), 1e-3 (L))"),
    lr: Optional[float] = typer.Option(None, help="Absolute peak lr (overrides --blr)."),
    lr_scaling: str = typer.Option("sqrt", help="sqrt: blr * sqrt(batch) / 8 (official) | linear: blr * batch / 256 (MAE)."),
    layer_decay: Optional[float] = typer.Option(None, help="Layer-wise lr decay  (default: 0.75 (Ti/S), 0.65 (B, L))"),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay."),
    min_lr: float = typer.Option(1e-6, help="Final lr of the cosine."),
    warmup_epochs: float = typer.Option(5, help="Linear warm-up epochs."),
    drop_path: float = typer.Option(0.1, help="Stochastic depth rate."),
    smoothing: float = typer.Option(0.1, help="Label smoothing."),
    mixup: float = typer.Option(0.8, help="Mixup alpha (0 = off)."),
    cutmix: float = typer.Option(1.0, help="CutMix alpha (0 = off)."),
    randaug: str = typer.Option("rand-m9-mstd0.5-inc1", help="timm RandAugment config ('none' = off)."),
    reprob: float = typer.Option(0.25, help="Random erasing probability (official code; 0 = off)."),
    clip_grad: Optional[float] = typer.Option(None, help="Gradient norm clipping (none by default)."),
    pool: str = typer.Option("mean", help="Classify the mean of the patch tokens or the cls token."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Fine-tune the momentum (target) encoder instead of the online one."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, when the file has no config and the width is not a timm preset."),
    workers: int = typer.Option(2, help="Data loading processes (and RandAugment threads)."),
    eval_every: int = typer.Option(1, help="Evaluate on val every N epochs (and at the end)."),
    val_fraction: float = typer.Option(0.2, help="Val share per class when --data has no train/ and val/."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/finetune_state.pt (saved after every epoch; same options)."),
) -> None:
    """End-to-end fine-tuning with the paper's Table D recipe; writes the fine-tuned model and top-1/top-5."""
    from lut_fast.evaluation.finetune import run_finetune

    _refuse_torchrun("finetune")
    out = _out(out, ckpt, "finetune")
    if eval_every < 1:
        raise UserError("--eval-every must be >= 1")
    r = run_finetune(
        ckpt, data, out, backend, train_data, epochs, max_steps, batch_size, accum, blr, lr,
        lr_scaling, layer_decay, weight_decay, min_lr, warmup_epochs, drop_path, smoothing, mixup, cutmix, randaug,
        reprob, clip_grad, _choice(pool, ("mean", "cls"), "--pool"), use_ema, num_heads, workers, eval_every,
        val_fraction=val_fraction, seed=seed, device=device, resume=resume,
    )
    record_cli_result(ctx, out / "finetune.json", "eval finetune", [ckpt], data, train_data=train_data)
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    _say(f"fine-tuned {r['steps']} steps: top-1 [bold]{r['top1']:.2f}%[/]{top5}  ->  {out / 'finetune.json'}, {out / 'finetuned.pt'}")


@eval_app.command("robustness")
def robustness(
    ctx: typer.Context,
    classifiers: list[Path] = typer.Argument(..., help="finetuned.pt of `eval finetune` or linear_head.pt of `eval linear`; several are compared side by side."),
    data: Optional[str] = typer.Option(None, help="Val split: ROOT/val or ROOT's class folders  (default: the built-in val split)."),
    out: Optional[Path] = typer.Option(None, help="Results folder  (default: <run>/eval/robustness beside the first classifier)"),
    occlusion: Optional[float] = typer.Option(None, help="Occluded share of the image area, a centred square  (default: one patch, the paper; 0 = skip)."),
    occlusion_fill: str = typer.Option("black", help="black (pixels 0) | mean (normalisation mean)."),
    corruptions: str = typer.Option("common", help="Comma list of corruption names and/or groups: noise, blur, weather, digital, common (the 15 of ImageNet-C), validation, all; none = skip."),
    severities: str = typer.Option("1,2,3,4,5", help="Comma list of severities (1..5)."),
    reference_errors: Optional[str] = typer.Option(None, help="Reference errors for mCE: alexnet (ImageNet-C's) or a YAML/JSON file (format in the README)."),
    shift: Optional[list[str]] = typer.Option(None, help="Distribution-shift set NAME=FOLDER (repeatable): ImageNet-V2 / -R / -A / -Sketch / ObjectNet layouts."),
    class_map: Optional[list[str]] = typer.Option(None, help="NAME=FILE (repeatable): maps a set's folders to the classifier's classes (ObjectNet)."),
    max_images: Optional[int] = typer.Option(None, help="Evaluate an evenly spaced subset of this many images per set (quick runs)."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(2, help="Data loading and corrupting processes."),
    crop_pct: float = typer.Option(0.875, help="Center-crop fraction."),
    seed: int = typer.Option(0, help="Seed of every image's corruption."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Robustness of classifiers: clean vs center-occluded, ImageNet-C corruptions (mCE), distribution-shift sets."""
    from lut_fast.evaluation.robustness import RobustnessConfig, default_out, parse_pairs, run_robustness

    for c in classifiers:
        if not c.is_file():
            raise UserError(f"classifier not found: {c}")
    if out is None and len(classifiers) > 1:
        raise UserError("several classifiers: give --out for their shared results")
    try:
        sev = [int(s) for s in severities.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--severities is a comma list of integers 1..5, got {severities!r}") from None
    shifts, maps = parse_pairs(shift, "--shift"), parse_pairs(class_map, "--class-map")
    out = out if out is not None else default_out(classifiers[0])
    cfg = RobustnessConfig(
        data=data, out=str(out), occlusion=occlusion, occlusion_fill=occlusion_fill, corruptions=[corruptions],
        severities=sev, reference_errors=reference_errors, shift=shifts, class_map=maps, max_images=max_images,
        batch_size=batch_size, workers=workers, crop_pct=crop_pct, seed=seed, device=device,
    )
    r = run_robustness(classifiers, cfg)
    encoders = [c["source_checkpoint"] for c in r["classifiers"] if c["kind"] == "linear"]
    record_cli_result(ctx, out / "robustness.json", "eval robustness", [*classifiers, *encoders], data,
                      **{f"shift_{name}": path for name, path in shifts.items()})
    from rich.console import Console

    table, notes, needed = robustness_summary(r)
    # Piped or in a narrow terminal, rich would squeeze the columns and cut the condition names: never.
    console = Console()
    console = Console(width=max(console.width, needed))
    console.print(table)
    for line in [*notes, f"->  {out / 'robustness.json'}, {r['plot']}"]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def robustness_summary(r: dict):
    """What is printed at the end: a table (one row per condition, one column per classifier), notes, and
    the width the table needs."""
    from rich.markup import escape
    from rich.table import Table

    entries = r["results"]
    table = Table(title="robustness: top-1 (%)")
    table.add_column("condition")
    for e in entries:
        table.add_column(escape(e["label"]), justify="right")

    widths = [len("condition")] + [max(8, len(e["label"])) for e in entries]

    def row(name: str, values) -> None:
        widths[0] = max(widths[0], len(name))
        table.add_row(name, *[("-" if v is None else f"{v:.2f}") for v in values])

    row("clean", [e["clean_top1"] for e in entries])
    if "occluded_top1" in entries[0]:
        occ = r["occlusion"]
        row(f"center occluded ({occ['side_px']}x{occ['side_px']} px, {100 * occ['fraction']:.1f}%)", [e["occluded_top1"] for e in entries])
    for name in r["corruptions_run"]:
        sevs = ", ".join(f"{s}: " + "/".join(f"{e['corruptions'][name][str(s)]:.1f}" for e in entries) for s in r["severities"])
        row(escape(f"{name}  ({sevs})") if len(r["severities"]) > 1 and len(entries) == 1 else name, [e["corruption_top1"][name] for e in entries])
    if r["corruptions_run"]:
        row("corruption mean", [e["corruption_mean_top1"] for e in entries])
        if any("mce" in e for e in entries):
            row(f"mCE vs {entries[0]['mce']['reference']} (lower is better)", [e["mce"]["mce"] for e in entries])
            if any("relative_mce" in e["mce"] for e in entries):
                row("relative mCE", [e["mce"].get("relative_mce") for e in entries])
    for name in entries[0]["shift"]:
        row(escape(f"{name} ({entries[0]['shift'][name]['images']} images)"), [e["shift"][name]["top1"] for e in entries])
    notes = [f"skipped corruption {name}: {why}" for name, why in r["corruptions_skipped"].items()]
    left_out: dict[str, list[str]] = {}  # the same reason holds for every classifier: one line per reason
    for e in entries:
        for name, why in (e.get("mce") or {}).get("skipped", {}).items():
            if name not in left_out.setdefault(why, []):
                left_out[why].append(name)
    notes += [f"left out of the mCE ({', '.join(names)}): {why}" for why, names in left_out.items()]
    return table, notes, sum(widths) + 3 * len(widths) + 1
