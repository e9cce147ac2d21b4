"""Bench reports: one JSON document per run (machine + settings + result rows), rich tables, comparisons.

Every result row has ``bench`` (data | train | e2e), a ``key`` that names the
same measurement across runs (``train/lut_sym/eager bf16 sdpa=auto nchw``), a
``status`` (ok | skipped | unavailable | failed) with a ``reason`` when not
ok, and its figures. ``compare`` matches rows of two reports by key.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lut_fast.fileio import write_json_atomic

SCHEMA = "lut-fast-bench/1"

# The figures shown in tables and compared, per bench: (field, column title, format, higher_is_better).
COLUMNS = {
    "data": [
        ("images_per_sec", "img/s", "{:.1f}", True),
        ("cpu_ms_per_image", "CPU ms/img", "{:.2f}", False),
        ("frac_of_decode_floor", "of floor", "{:.0%}", True),
        ("frac_of_decode_floor_cpu", "of floor CPU", "{:.0%}", True),
        ("frac_of_source_floor_cpu", "of src floor CPU", "{:.0%}", True),
        ("vs_official", "vs official", "{:.2f}x", True),
        ("resize_bound_frac_of_floor_cpu", "its resize's bound", "{:.0%}", None),
    ],
    "train": [
        ("ms_per_step", "ms/step", "{:.1f}", False),
        ("images_per_sec", "img/s", "{:.1f}", True),
        ("peak_mem_mb", "peak MiB", "{:.0f}", False),
        ("gflops_per_image", "GF/img", "{:.4g}", None),
        ("achieved_tflops", "TFLOP/s", "{:.3g}", True),
        ("mfu", "MFU", "{:.1%}", True),
        ("lut_mae_time_ratio", "vs MAE", "{:.2f}x", False),
        ("lut_simmim_time_ratio", "vs SimMIM", "{:.2f}x", False),
    ],
    "e2e": [
        ("images_per_sec", "img/s", "{:.1f}", True),
        ("step_ms", "ms/step", "{:.1f}", False),
        ("data_wait_frac", "data wait", "{:.0%}", False),
        ("compute_images_per_sec", "no-wait img/s", "{:.1f}", True),
    ],
    "feed": [  # the GPU check's loader-feed rows (bench/feed.py)
        ("images_per_sec", "img/s", "{:.1f}", True),
        ("cpu_ms_per_image", "CPU ms/img", "{:.2f}", False),
        ("trainer_process_cpu_ms_per_image", "trainer proc. CPU ms/img", "{:.3f}", False),
        ("host_cpu_ms_per_image", "host CPU ms/img", "{:.3f}", False),
        ("host_cpu_ms_per_image_one_thread", "same, 1 thread", "{:.3f}", False),
    ],
}
BENCH_KINDS = tuple(COLUMNS)


def new_report(kind: str, settings: dict, machine: dict | None = None) -> dict:
    from lut_fast.bench.machine import machine_info

    return {
        "schema": SCHEMA,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["lut-fast" if i == 0 else a for i, a in enumerate(sys.argv)]),
        "machine": machine if machine is not None else machine_info(),
        "settings": settings,
        "results": [],
    }


def row(bench: str, key: str, status: str = "ok", reason: str | None = None, **fields: Any) -> dict:
    out = {"bench": bench, "key": key, "status": status}
    if reason is not None:
        out["reason"] = reason
    out.update(fields)
    return out


def _plain(x: Any) -> Any:
    """JSON-safe: NaN / inf become null, tuples lists, paths strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Write the report atomically (temporary file, then rename)."""
    return write_json_atomic(_plain(report), path)


def load_json(path: str | os.PathLike) -> dict:
    from lut_fast.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"bench report not found: {p}")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not a JSON bench report: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{p} is not a lut-fast bench report (schema {SCHEMA})")
    return doc


# ---------------------------------------------------------------- terminal tables


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def tables(report: dict) -> list:
    """One rich Table per bench kind present in the report."""
    from rich.table import Table

    out = []
    for bench in BENCH_KINDS:
        rows = [r for r in report["results"] if r.get("bench") == bench]
        if not rows:
            continue
        t = Table(title=f"bench {bench}", title_justify="left")
        t.add_column("what", no_wrap=True, min_width=max(len(r.get("label") or r["key"]) for r in rows))
        for _, title, _, _ in COLUMNS[bench]:
            t.add_column(title, justify="right", no_wrap=True, min_width=max(6, len(title)))
        t.add_column("note", no_wrap=True, overflow="ellipsis", max_width=60)
        for r in rows:
            what = r.get("label") or r["key"]
            if r["status"] != "ok":
                t.add_row(what, *["-"] * len(COLUMNS[bench]), f"[yellow]{r['status']}[/]: {r.get('reason', '')}")
                continue
            cells = [_fmt(r.get(f), fmt) for f, _, fmt, _ in COLUMNS[bench]]
            t.add_row(what, *cells, r.get("note", ""))
        out.append(t)
    return out


def wide_console():
    """The terminal's console; 160 columns when output goes to a file or pipe (rich would use 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_report(report: dict, console=None) -> None:
    from lut_fast.bench.machine import describe

    console = console or wide_console()
    console.print(f"[bold]{describe(report['machine'])}[/]")
    for t in tables(report):
        console.print(t)
    for line in report.get("notes", []):
        console.print(line)


def plain_text(report: dict, width: int = 160) -> str:
    """The same tables as plain text (for files)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    print_report(report, Console(file=buf, width=width, color_system=None, force_terminal=False))
    return buf.getvalue()


def markdown(report: dict) -> str:
    """The report's tables as Markdown (for docs)."""
    lines = []
    for bench in BENCH_KINDS:
        rows = [r for r in report["results"] if r.get("bench") == bench]
        if not rows:
            continue
        cols = COLUMNS[bench]
        lines.append("| what | " + " | ".join(t for _, t, _, _ in cols) + " | note |")
        lines.append("|---|" + "---:|" * len(cols) + "---|")
        for r in rows:
            what = r.get("label") or r["key"]
            if r["status"] != "ok":
                cells, note = ["-"] * len(cols), f"{r['status']}: {r.get('reason', '')}"
            else:
                cells, note = [_fmt(r.get(f), fmt) for f, _, fmt, _ in cols], r.get("note", "")
            lines.append(f"| {what} | " + " | ".join(cells) + f" | {note} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- comparing two runs


def compare_reports(a: dict, b: dict) -> list[dict]:
    """Rows present and ok in both, with B/A ratios of each figure."""
    by_key = {r["key"]: r for r in a["results"] if r.get("status") == "ok"}
    out = []
    for rb in b["results"]:
        ra = by_key.get(rb["key"])
        if ra is None or rb.get("status") != "ok":
            continue
        for field, title, fmt, higher in COLUMNS.get(rb["bench"], []):
            va, vb = ra.get(field), rb.get(field)
            if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
                continue
            ratio = vb / va if va else None
            out.append({"key": rb["key"], "field": field, "title": title, "fmt": fmt, "a": va, "b": vb,
                        "ratio": ratio, "higher_is_better": higher})
    return out


def settings_diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    diffs = []
    for section in ("settings", "machine"):
        sa, sb = a.get(section, {}), b.get(section, {})
        for k in sorted(set(sa) | set(sb)):
            if sa.get(k) != sb.get(k):
                diffs.append((f"{section}.{k}", sa.get(k), sb.get(k)))
    return diffs


def print_comparison(a: dict, b: dict, name_a: str, name_b: str, console=None) -> list[dict]:
    from rich.table import Table

    console = console or wide_console()
    rows = compare_reports(a, b)
    t = Table(title=f"B / A   (A = {name_a}, B = {name_b})", title_justify="left")
    for col, just in (("what", "left"), ("figure", "left"), ("A", "right"), ("B", "right"), ("B/A", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        if r["ratio"] is not None and r["higher_is_better"] is not None and abs(r["ratio"] - 1) >= 0.02:
            better = (r["ratio"] > 1) == r["higher_is_better"]
            ratio = f"[{'green' if better else 'red'}]{ratio}[/]"
        t.add_row(r["key"], r["title"], _fmt(r["a"], r["fmt"]), _fmt(r["b"], r["fmt"]), ratio)
    if rows:
        console.print(t)
    else:
        console.print("[yellow]no measurement appears (status ok) in both reports[/]")
    diffs = settings_diff(a, b)
    if diffs:
        console.print("[bold]differences in settings / machine:[/]")
        for k, va, vb in diffs:
            console.print(f"  {k}: {va!r} -> {vb!r}")
    return rows

