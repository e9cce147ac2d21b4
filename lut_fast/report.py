"""``lut-fast report``: one table across runs, in the terminal (rich) or as markdown.

Each argument is a run folder or a result JSON of ``eval`` / ``analyze``. A
run folder contributes its method, steps, final loss and last online k-NN
(``metrics.jsonl``) and the results under ``<run>/eval/`` (k-NN, linear
probe, fine-tuning, robustness: center-occluded and corruption-mean top-1,
mCE; a robustness result's classifiers join the run they were trained from). A result JSON is matched to its run through the
checkpoint it evaluated (``<run>/checkpoints/*.pt``); results of checkpoints
outside a run folder get rows of their own. Attention-distance results add
one column per layer (the mean over heads, as a fraction of the image side).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lut_fast.errors import UserError

EVAL_FILES = {"knn": "eval/knn/knn.json", "linear": "eval/linear/linear.json", "finetune": "eval/finetune/finetune.json",
              "robustness": "eval/robustness/robustness.json"}
COLUMNS = [("method", "method"), ("steps", "steps"), ("final_loss", "final loss"), ("online_knn", "online k-NN"),
           ("knn", "k-NN top-1"), ("linear", "linear top-1"), ("finetune", "fine-tune top-1"),
           ("occluded", "center-occluded top-1"), ("corrupted", "corruption mean top-1"), ("mce", "mCE")]
PERCENT_COLUMNS = ("knn", "linear", "finetune", "online_knn", "occluded", "corrupted", "mce")


@dataclass
class Row:
    label: str
    values: dict = field(default_factory=dict)
    aad: Optional[list[float]] = None  # mean attention distance per layer


def run_of_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """``<run>`` for ``<run>/checkpoints/<file>`` (the path as given: ``last.pt`` is not followed)."""
    p = Path(os.path.abspath(path))
    return p.parent.parent if p.parent.name == "checkpoints" else None


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a result file of lut-fast eval / analyze")
    return data


def _checkpoint_paths(result: dict) -> list[str]:
    """The checkpoints a result evaluated: from its protocol, else from its encoder descriptions."""
    if "protocol" in result:
        return [c["path"] for c in result["protocol"]["checkpoints"]]
    if "encoder" in result:
        return [result["encoder"]["checkpoint"]]
    return [c["encoder"]["checkpoint"] for c in result.get("checkpoints", [])]


class Table:
    def __init__(self):
        self.rows: dict[str, Row] = {}

    def row(self, key: str, label: str) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(label)
        return self.rows[key]

    def row_for_checkpoint(self, ckpt: str, fallback_label: str) -> Row:
        run = run_of_checkpoint(ckpt)
        if run is not None:
            return self.row(str(run.resolve()), run.resolve().name)
        return self.row(os.path.abspath(ckpt), fallback_label)

    def add_run(self, run: Path) -> None:
        from lut_fast.plot import read_metrics, run_method

        has_metrics = (run / "metrics.jsonl").is_file()
        found = [name for name, rel in EVAL_FILES.items() if (run / rel).is_file()]
        if not has_metrics and not found:
            raise UserError(f"{run} has neither metrics.jsonl nor eval results: pass a run folder or a result JSON")
        row = self.row(str(run.resolve()), run.resolve().name)
        row.values["method"] = run_method(run)
        if has_metrics:
            records = read_metrics(run)
            losses = [r for r in records if "loss" in r]
            knn = [r for r in records if "knn_top1" in r]
            if records:
                row.values["steps"] = max(r.get("step", 0) for r in records)
            if losses:
                row.values["final_loss"] = losses[-1]["loss"]
            if knn:
                row.values["online_knn"] = knn[-1]["knn_top1"]
        for name in found:
            self.add_result(run / EVAL_FILES[name])

    def add_result(self, path: Path) -> None:
        result = _load_json(path)
        command = result.get("command")
        ckpts = _checkpoint_paths(result)
        if command in ("knn", "linear", "finetune"):
            if not ckpts:
                raise UserError(f"{path} does not say which checkpoint it evaluated")
            row = self.row_for_checkpoint(ckpts[0], str(path))
            row.values[command] = result["top1"]
            method = (result.get("encoder") or {}).get("method")
            row.values.setdefault("method", method)
        elif command == "robustness":
            from lut_fast.evaluation.robustness import report_values

            used: set[int] = set()
            for classifier, values in report_values(result):  # rows by the pre-training checkpoint each came from
                row = self.row_for_checkpoint(classifier["source_checkpoint"] or classifier["path"], classifier["label"])
                if id(row) in used:  # a second classifier of the same encoder (fine-tuned and linear): its own row
                    row = self.row(os.path.abspath(classifier["path"]), classifier["label"])
                used.add(id(row))
                row.values.update(values)
                row.values.setdefault("method", classifier.get("method"))
        elif command == "attention-distance":
            for entry, ckpt in zip(result["checkpoints"], ckpts):
                row = self.row_for_checkpoint(ckpt, entry["label"])
                row.aad = list(entry["layer_mean"])
                row.values.setdefault("method", entry["encoder"].get("method"))
        else:
            raise UserError(
                f"{path} is not a k-NN, linear, fine-tune, robustness or attention-distance result (command {command!r})"
            )


def collect_rows(items: list[str | os.PathLike]) -> list[Row]:
    if not items:
        raise UserError("give at least one run folder or result JSON")
    table = Table()
    for item in items:
        p = Path(item)
        if p.is_dir():
            table.add_run(p)
        elif p.is_file():
            table.add_result(p)
        else:
            raise UserError(f"not found: {p}")
    return list(table.rows.values())


def _cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells; columns nobody has are left out."""
    present = [(key, title) for key, title in COLUMNS if any(r.values.get(key) is not None for r in rows)]
    depth = max((len(r.aad) for r in rows if r.aad), default=0)
    header = ["run"] + [t for _, t in present] + [f"AAD L{i + 1}" for i in range(depth)]

    def fmt(key: str, v) -> str:
        if v is None:
            return "-"
        if key in PERCENT_COLUMNS:
            return f"{v:.2f}%"
        if key == "final_loss":
            return f"{v:.4f}"
        return str(v)

    body = []
    for r in rows:
        aad = [f"{x:.3f}" for x in (r.aad or [])] + ["-"] * (depth - len(r.aad or []))
        body.append([r.label] + [fmt(k, r.values.get(k)) for k, _ in present] + aad)
    return header, body


def to_markdown(rows: list[Row]) -> str:
    header, body = _cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    header, body = _cells(rows)
    table = RichTable(title="lut-fast report (AAD: mean attention distance per layer, fraction of the image side)")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for cells in body:
        table.add_row(*[escape(c) for c in cells])
    # Piped or in a narrow terminal, rich would squeeze the columns into 80 characters: never cut a number.
    width = sum(max(len(h), *(len(r[i]) for r in body)) + 3 for i, h in enumerate(header)) + 1
    console = Console()
    Console(width=max(console.width, width)).print(table)
