"""``lut-fast eval``: k-NN, linear probing and fine-tuning of a pre-trained encoder.

Every command accepts lut-fast checkpoints (online encoder, or the momentum
one with ``--use-ema`` where it applies), ``lut-fast export timm`` files and
official-MAE-style checkpoints (``{"model": {...}}``, encoder keys only).
Results are JSON files written atomically into ``--out``, each with its
full protocol (checkpoint sha256, settings, data fingerprint: ``records.py``).

Settings are typed (``evaluation/config.py``): defaults <- ``--config FILE`` (YAML, or an earlier
result JSON) <- flags <- ``--set key=value``; ``--print-config`` shows them and where each came from.
Each command is a function of its settings; ``evaluation/command.py`` makes its options from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lut_fast.errors import UserError
from lut_fast.evaluation.command import settings_command
from lut_fast.evaluation.config import FinetuneConfig, KnnConfig, LinearConfig
from lut_fast.evaluation.robustness import RobustnessConfig
from lut_fast.records import record_result

eval_app = typer.Typer(
    help="Evaluate a pre-trained encoder: k-NN, linear probe, fine-tuning; robustness of the classifiers they give.",
    no_args_is_help=True, add_completion=False,
)

CKPT_HELP = "Checkpoint: lut-fast .pt, an exported timm encoder, or an MAE-style {'model': ...} file."


def _out(out: Optional[Path], ckpt: Path, what: str) -> Path:
    from lut_fast.evaluation.common import default_out

    if not ckpt.is_file():
        raise UserError(f"checkpoint not found: {ckpt}")
    return out if out is not None else default_out(ckpt, what)


def _say(text: str) -> None:
    from rich.console import Console

    Console().print(text)


@settings_command(eval_app, "knn", KnnConfig, label="eval knn")
def knn(
    cfg: KnnConfig,
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    out: Optional[Path] = typer.Option(None, help="Results folder  (default: <run>/eval/knn)"),
) -> None:
    """Frozen-encoder k-NN accuracy (cosine similarity, temperature-weighted votes)."""
    from lut_fast.evaluation.knn import run_knn

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


@settings_command(eval_app, "linear", LinearConfig, label="eval linear",
                  helps={"seed": "seed of the split, the head's init and the batch order"})
def linear(
    cfg: LinearConfig,
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    out: Optional[Path] = typer.Option(None, help="Results folder  (default: <run>/eval/linear)"),
) -> None:
    """Linear probe (MAE protocol): frozen encoder, BatchNorm without affine + Linear, on cached features."""
    from lut_fast.evaluation.linear import run_linear

    _refuse_torchrun("linear")
    out = _out(out, ckpt, "linear")
    r = run_linear(ckpt, cfg, out)
    record_result(out / "linear.json", "eval linear", [ckpt], cfg)
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    _say(f"linear probe ({cfg.epochs} epochs, {cfg.pool}): top-1 [bold]{r['top1']:.2f}%[/]{top5} (best {r['best_top1']:.2f}%)  ->  {out / 'linear.json'}")


@settings_command(eval_app, "finetune", FinetuneConfig, label="eval finetune",
                  helps={"workers": "data loading processes (and RandAugment threads)"})
def finetune(
    cfg: FinetuneConfig,
    ckpt: Path = typer.Argument(..., help=CKPT_HELP),
    out: Optional[Path] = typer.Option(None, help="Results and model folder  (default: <run>/eval/finetune)"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/finetune_state.pt (saved after every epoch; same settings)."),
) -> None:
    """End-to-end fine-tuning with the paper's Table D recipe; writes the fine-tuned model and top-1/top-5."""
    from lut_fast.evaluation.finetune import run_finetune

    _refuse_torchrun("finetune")
    out = _out(out, ckpt, "finetune")
    r = run_finetune(ckpt, cfg, out, resume=resume)
    record_result(out / "finetune.json", "eval finetune", [ckpt], cfg, {"resume": resume}, train_data=cfg.train_data)
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    _say(f"fine-tuned {r['steps']} steps: top-1 [bold]{r['top1']:.2f}%[/]{top5}  ->  {out / 'finetune.json'}, {out / 'finetuned.pt'}")


@settings_command(eval_app, "robustness", RobustnessConfig, label="eval robustness", helps={
    "corruptions": "corruption names and/or groups (comma lists, repeatable): noise, blur, weather, digital, "
                   "common (the 15 of ImageNet-C), validation, all; none = skip"})
def robustness(
    cfg: RobustnessConfig,
    classifiers: list[Path] = typer.Argument(
        ..., help="finetuned.pt of `eval finetune` or linear_head.pt of `eval linear`; several are compared side by side."),
    out: Optional[Path] = typer.Option(None, help="Results folder  (default: <run>/eval/robustness beside the first classifier)"),
) -> None:
    """Robustness of classifiers: clean vs center-occluded, ImageNet-C corruptions (mCE), distribution-shift sets."""
    from lut_fast.evaluation.robustness import default_out, run_robustness

    for c in classifiers:
        if not c.is_file():
            raise UserError(f"classifier not found: {c}")
    if out is None and len(classifiers) > 1:
        raise UserError("several classifiers: give --out for their shared results")
    out = out if out is not None else default_out(classifiers[0])
    r = run_robustness(classifiers, cfg, out=out)
    encoders = [c["source_checkpoint"] for c in r["classifiers"] if c["kind"] == "linear"]
    record_result(out / "robustness.json", "eval robustness", [*classifiers, *encoders], cfg,
                  **{f"shift_{name}": path for name, path in cfg.shift_sets.items()})
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
