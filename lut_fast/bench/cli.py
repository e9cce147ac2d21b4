"""``lut-fast bench``: data | train | e2e | compare | gpu.

Each command prints a rich table and, with ``--json FILE``, writes every
figure with the machine and the settings (atomically), so that
``lut-fast bench compare A.json B.json`` can put two runs side by side.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import typer

bench_app = typer.Typer(
    help="Throughput: data pipelines vs the decode floor, the train step vs MAE and the GPU's peak, end to end.",
    no_args_is_help=True,
)

JSON_HELP = "Write every figure, the machine and the settings to this JSON file (atomically)."


def _device(name: str):
    from lut_fast.runtime import resolve_device

    return resolve_device(name)


def _default_workers() -> int:
    from lut_fast.bench.machine import usable_cores

    return min(8, usable_cores())


def _set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        import torch

        from lut_fast.errors import UserError

        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _finish(report: dict, json_path: Optional[Path]) -> None:
    from lut_fast.bench.report import print_report, write_json

    with contextlib.suppress(OSError, AttributeError):
        report["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print_report(report)
    if json_path is not None:
        write_json(report, json_path)
        typer.echo(f"wrote {json_path}")


@bench_app.command("data")
def data_cmd(
    backend: str = typer.Option("all", help="torch | dali | ffcv, a comma list, or all (every backend; those whose library is missing say how to install it)."),
    data: str = typer.Option("photos:1024", help="ImageFolder tree; 'photos[:N]' (crops of real photographs, ImageNet-sized, made once), "
                                                        "'synthetic[:N]' or 'builtin'. A folder made by `lut-fast convert folder` "
                                                        "is also measured against the floor of its source."),
    torch_data: Optional[str] = typer.Option(None, help="What the torch backend reads, if not --data (e.g. a folder made by `lut-fast convert folder`)."),
    dali_data: Optional[str] = typer.Option(None, help="What the DALI backend reads, if not --data (e.g. shards made by `lut-fast convert dali`)."),
    ffcv_data: Optional[str] = typer.Option(None, help="What the FFCV backend reads (a .beton made by `lut-fast convert ffcv`); "
                                                            "without it FFCV rows say how to make one."),
    pipelines: str = typer.Option("lut,mae", help="lut (dual-view) and/or mae (single-view)."),
    configurations: str = typer.Option("gpu-training,cpu-only", help="gpu-training (the CPU side alone: raw uint8 batches, photometric ops left to the device) "
                                                         "and/or cpu-only (every op on the CPU)."),
    official: bool = typer.Option(True, "--official/--no-official", help="Time the official LUT recipe as the reference row."),
    img_size: int = typer.Option(224, help="Output size of the views."),
    batch_size: int = typer.Option(32),
    workers: Optional[int] = typer.Option(None, help="Loader workers / threads; the decode floor uses as many threads.  [default: min(8, cores)]"),
    device: str = typer.Option("auto", help="auto | cpu | cuda: on cuda the gpu-training rows pin memory and device-stage rows are added."),
    warmup: int = typer.Option(1, help="Untimed rounds first (one window of every subject each)."),
    windows: int = typer.Option(5, help="Timed rounds; each row reports its median window."),
    window_batches: int = typer.Option(8, help="Batches per window (a thread loader restarts from idle in each: longer windows amortise that)."),
    floor_files: int = typer.Option(256, help="Files the decode floor cycles through (per file set)."),
    gpu_decode: Optional[bool] = typer.Option(None, "--gpu-decode/--no-gpu-decode", help="Also time decode_jpeg on the device + torch-op views  "
                                                                                             "[default: on with CUDA]."),
    json_path: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Images/s and CPU ms per image of each backend x recipe x configuration, against the JPEG decode floor,
    the bound LUT's resize sets and the official recipe, timed interleaved."""
    from lut_fast.bench.data import run_data_bench
    from lut_fast.bench.report import new_report
    from lut_fast.errors import UserError

    if backend != "all" and not {b.strip() for b in backend.split(",")} <= {"torch", "dali", "ffcv"}:
        raise UserError(f"unknown backend {backend!r}; choose torch, dali, ffcv (a comma list) or all")
    if min(batch_size, windows, window_batches, floor_files) < 1 or warmup < 0:
        raise UserError("batch size, windows, window batches and floor files must be >= 1; warmup >= 0")
    workers = _default_workers() if workers is None else workers
    dev = _device(device)
    recipes = [p.strip() for p in pipelines.split(",") if p.strip()]
    confs = tuple(c.strip() for c in configurations.split(",") if c.strip())
    settings = dict(backend=backend, data=data, pipelines=recipes, img_size=img_size, batch_size=batch_size,
                    workers=workers, device=str(dev), warmup_rounds=warmup, windows=windows, window_batches=window_batches)
    report = new_report("data", settings)
    results, info = run_data_bench(
        backend, data, recipes, img_size, batch_size, workers, dev, windows, window_batches, floor_files,
        backend_data={"torch": torch_data, "dali": dali_data, "ffcv": ffcv_data}, configurations=confs, official=official,
        warmup_rounds=warmup, device_decode=gpu_decode, progress=lambda m: typer.echo(m, err=True),
    )
    report["settings"].update(info)
    report["results"] = results
    report["notes"] = data_notes(info)
    _finish(report, json_path)


def data_notes(info: dict) -> list[str]:
    floors = info.get("decode_floors") or {}
    lines = [f"decode floor ({name}): {f.get('images_per_sec') or 0:.0f} img/s ({f.get('decoder')}), "
             f"{f.get('cpu_ms_per_image') or 0:.2f} CPU ms/img at best, {info['floor_threads']} thread(s), decode only"
             for name, f in floors.items()]
    lines.append("of floor = img/s / floor img/s (wall clock); of floor CPU = floor CPU ms / row CPU ms; "
                 "vs official = img/s / the official recipe's (LUT rows; the CPU-ms ratio is in the JSON); "
                 "its resize's bound = the 'bound' row's share of the floor for the files and resize of a LUT "
                 "gpu-training row: decode + that resize + both windows with no loader, the most the row can reach")
    load = (info.get("load_avg_start") or [None])[0], (info.get("load_avg_end") or [None])[0]
    lines.append(f"load average (1 min): {load[0]} at start, {load[1]} at end; {info.get('elapsed_s')} s")
    return lines


# bench train's defaults: (GPU, CPU). A CPU step of ViT-Ti at 224 px, batch 32, takes tens of seconds on a small machine.
TRAIN_DEFAULTS = {"batch_size": (32, 8), "img_size": (224, 96), "warmup": (2, 1), "windows": (3, 3), "steps_per_window": (3, 1)}


@bench_app.command("train")
def train_cmd(
    model: str = typer.Option("vit_tiny", help="vit_tiny | vit_small | vit_base | vit_large"),
    methods: str = typer.Option("mae,lut_sym,lut_one_way", help="Any of mae, lut_sym, lut_one_way, simmim, lut_simmim_sym, lut_simmim_one_way."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step.  [default: 32; on CPU 8]"),
    img_size: Optional[int] = typer.Option(None, help="[default: 224; on CPU 96]"),
    patch_size: int = typer.Option(16),
    compile: str = typer.Option("off", help="Comma list of on/off: torch.compile the student."),
    precision: str = typer.Option("auto", help="Comma list of auto, fp32, bf16, fp16 (auto: bf16 on GPUs that have it, fp32 on CPU)."),
    sdpa: str = typer.Option("auto", help="Comma list of auto, flash, efficient, math, cudnn (torch.nn.attention.sdpa_kernel)."),
    channels_last: str = typer.Option("off", help="Comma list of on/off: channels-last inputs and patch-embedding weights."),
    grid: bool = typer.Option(False, "--grid", help="Every combination; default: the first value of each list is the baseline "
                                                       "and each other value is toggled alone."),
    all_variants: bool = typer.Option(False, "--all-variants", help="compile off,on; precision fp32,bf16,fp16; sdpa auto,flash,efficient,math; "
                                                                       "channels-last off,on."),
    warmup: Optional[int] = typer.Option(None, help="Untimed steps of each method first (torch.compile compiles here).  [default: 2; on CPU 1]"),
    windows: Optional[int] = typer.Option(None, help="Timed windows; the median is reported.  [default: 3]"),
    steps_per_window: Optional[int] = typer.Option(None, help="[default: 3; on CPU 1]"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    peak_tflops: Optional[float] = typer.Option(None, help="The GPU's bf16 peak for MFU, if the card is not in the built-in table."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op CPU threads  [default: torch's choice]"),
    set_: list[str] = typer.Option([], "--set", help="Any config field, e.g. --set model.depth=2 --set model.decoder_depth=1"),
    json_path: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """ms/step, images/s, peak memory, FLOPs and MFU of MAE and LUT training steps on synthetic on-device inputs, methods interleaved step by step."""
    from lut_fast.bench.machine import machine_info
    from lut_fast.bench.report import new_report
    from lut_fast.bench.train_step import ALL_VARIANTS, make_variants, run_train_bench

    dev = _device(device)
    _set_threads(threads)
    on_cpu = dev.type != "cuda"
    given = dict(batch_size=batch_size, img_size=img_size, warmup=warmup, windows=windows, steps_per_window=steps_per_window)
    chosen = {k: v if v is not None else TRAIN_DEFAULTS[k][on_cpu] for k, v in given.items()}
    if all_variants:
        compile, precision, sdpa, channels_last = (ALL_VARIANTS[k] for k in ("compile", "precision", "sdpa", "channels_last"))
    variants = make_variants(dev, compile, precision, sdpa, channels_last, grid)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    machine = machine_info()
    peak = peak_tflops or machine.get("gpu_bf16_peak_tflops")
    defaulted = sorted(k for k, v in given.items() if v is None)
    cpu_note = (f"CPU: small defaults for {', '.join(defaulted)} ({', '.join(f'{k}={chosen[k]}' for k in defaulted)}); "
                "pass them to measure other sizes") if on_cpu and defaulted else None
    typer.echo(f"bench train: {model}, {len(method_list)} method(s) x {len(variants)} variant(s), batch {chosen['batch_size']}, "
               f"{chosen['img_size']} px on {dev.type}, methods interleaved step by step; each variant prints an estimate "
               f"after its first steps{' (' + cpu_note + ')' if cpu_note else ''}", err=True)
    settings = dict(model=model, methods=method_list, batch_size=chosen["batch_size"], img_size=chosen["img_size"],
                    patch_size=patch_size, variants=[v.as_dict() for v in variants], grid=grid,
                    warmup_steps=chosen["warmup"], windows=chosen["windows"], steps_per_window=chosen["steps_per_window"],
                    device=str(dev), sets=list(set_), peak_tflops=peak, torch_threads=torch_threads(),
                    interleaved="methods step by step, same inputs", cpu_defaults=cpu_note,
                    flops_convention="analytic, lut_fast/flops.py: 2 x MACs of matmuls/attention, backward = 2 x forward, target forward only")
    report = new_report("train", settings, machine)
    report["results"] = run_train_bench(model, method_list, variants, dev, chosen["batch_size"], chosen["img_size"],
                                        patch_size, list(set_), chosen["warmup"], chosen["windows"],
                                        chosen["steps_per_window"], peak, say=lambda m: typer.echo(m, err=True))
    report["notes"] = ["vs MAE = LUT ms/step / MAE ms/step for the same variant (paper, ViT-B: 1.18); "
                       "the methods' steps alternate, so machine load hits them alike"]
    if cpu_note:
        report["notes"].append(cpu_note)
    _finish(report, json_path)


@bench_app.command("e2e")
def e2e_cmd(
    method: str = typer.Option("lut", help="lut | mae"),
    direction: str = typer.Option("symmetric", help="LUT direction: symmetric | one_way"),
    model: str = typer.Option("vit_tiny"),
    backend: str = typer.Option("torch", help="torch | dali | ffcv"),
    data: Optional[str] = typer.Option(None, help="As for train (ImageFolder tree / converted data; empty = built-in), "
                                                      "or synthetic[:N] / photos[:N] as for bench data."),
    batch_size: int = typer.Option(32),
    workers: Optional[int] = typer.Option(None, help="Loader workers  [default: min(8, cores)]"),
    steps: int = typer.Option(30, help="Optimizer steps in all."),
    warmup: int = typer.Option(5, help="Steps left out of the figures."),
    img_size: int = typer.Option(224),
    patch_size: int = typer.Option(16),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("auto"),
    compile: bool = typer.Option(False, "--compile/--no-compile"),
    threads: Optional[int] = typer.Option(None, help="torch intra-op CPU threads in the main process  [default: torch's choice]"),
    set_: list[str] = typer.Option([], "--set", help="Any config field, as for train."),
    json_path: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """The real train loop fed by a backend: images/s, the share of step time spent waiting for data, and a verdict."""
    from lut_fast.bench.e2e import run_e2e
    from lut_fast.bench.report import new_report

    workers = _default_workers() if workers is None else workers
    _set_threads(threads)
    r, cfg = run_e2e(method, model, backend, data, batch_size, workers, steps, warmup, img_size, device, precision,
                     compile, [f"model.patch_size={patch_size}", *set_], direction)
    settings = dict(method=method, direction=direction, model=model, backend=backend, data=data or "builtin",
                    batch_size=batch_size, workers=workers, steps=steps, warmup_steps=warmup, img_size=img_size,
                    patch_size=patch_size, device=device, precision=precision, compile=compile, sets=list(set_), torch_threads=torch_threads(),
                    config=cfg)
    report = new_report("e2e", settings)
    report["results"] = [r]
    report["verdict"] = r["verdict"]
    report["notes"] = [f"[bold]verdict:[/] {r['verdict']}"]
    if r.get("loader_cost_note"):
        report["notes"].append(f"[bold]note:[/] {r['loader_cost_note']}")
    _finish(report, json_path)


@bench_app.command("compare")
def compare_cmd(
    a: Path = typer.Argument(..., help="Baseline report (A)."),
    b: Path = typer.Argument(..., help="New report (B)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the ratios as JSON."),
) -> None:
    """Ratios B/A of every figure measured (ok) in both reports, and what differs in settings and machine."""
    from lut_fast.bench.report import load_json, print_comparison, settings_diff, write_json

    ra, rb = load_json(a), load_json(b)
    rows = print_comparison(ra, rb, str(a), str(b))
    if json_path is not None:
        diffs = [{"field": k, "a": va, "b": vb} for k, va, vb in settings_diff(ra, rb)]
        write_json({"schema": "lut-fast-bench-compare/1", "a": str(a), "b": str(b),
                    "ratios": [{k: v for k, v in r.items() if k != "fmt"} for r in rows], "differences": diffs}, json_path)
        typer.echo(f"wrote {json_path}")


@bench_app.command("gpu")
def gpu_cmd(
    out: Optional[Path] = typer.Option(None, help="Folder for gpu_check.json / gpu_check.txt  [default: $OUT, else runs/gpu_check]"),
    budget_s: float = typer.Option(420.0, help="Stop starting new measurements after this many seconds."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (a smoke test of the preset; runs on CPU too)."),
) -> None:
    """The GPU check preset (also docker/gpu_check.sh): vit_small / vit_base MAE vs LUT, eager vs compiled, bf16; GPU JPEG decode."""
    from lut_fast.bench.gpu_check import run_gpu_check

    folder = out or Path(os.environ.get("OUT") or "runs/gpu_check")
    run_gpu_check(folder, budget_s=budget_s, quick=quick)
