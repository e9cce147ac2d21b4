"""The GPU check: one call, under 8 minutes, on one H100 / H200, from a plain copy of the repo.

    bash docker/gpu_check.sh            # or: python -m lut_fast.bench.gpu_check   (from the repo root)
    lut-fast bench gpu                   # the same, installed

What it measures (bf16, synthetic on-device inputs for the train step):

1. train step, eager: vit_small and vit_base, MAE / LUT symmetric / LUT one-way
   (ms/step, images/s, peak memory, FLOPs, MFU, LUT/MAE time ratio);
2. data (``bench data`` on 1,024 crops of real photographs, every GPU-side
   path in one call): the decode floors, each backend's gpu-training
   configuration (the CPU side alone, pinned uint8 out; FFCV on a .beton
   converted here first) and cpu-only configuration, the official LUT recipe
   for reference, the device stage (``finish_batch``: copy, view 2's
   photometric ops and normalisation on the GPU), and ``decode_jpeg`` on CUDA
   (decode only, then with the views built on the GPU);
3. loader feed (``bench/feed.py``): the torch loader's ``Batch`` stream alone
   at the trainer's batch size (images/s, CPU ms per image of the process tree
   and of the training process), and the device stage's host CPU with its
   ``torch.profiler`` table (``device_stage_profile.txt``);
4. end to end (``bench e2e``): the real train loop on the torch backend, ViT-B
   LUT symmetric, eager: images/s and the share of each step spent waiting for data;
5. train step, ``torch.compile``: MAE and LUT symmetric for both models, as
   long as the time budget allows (a skipped row says so).

Without a visible CUDA device it stops at once with exit code 2 (``--quick``
runs a tiny smoke test of the preset on the CPU instead). Results are written after every row to ``$OUT/gpu_check.json`` (so a run cut
short still leaves its figures) and the table to ``$OUT/gpu_check.txt``.

Running without installing: the lent GPU machine has torch, timm, typer, rich
and numpy but not this package (``pipelines/`` and ``datasets/`` install as
``lut_fast.pipelines`` / ``lut_fast.datasets`` via setuptools ``package-dir``),
and maybe not PyYAML. ``bootstrap()`` puts the checkout on ``sys.path``, maps
those two packages with a meta-path finder, and, if PyYAML is missing, gives
``lut_fast.config`` (its only user) a minimal JSON-based ``yaml`` stand-in.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAPPED = {"lut_fast.pipelines": "pipelines", "lut_fast.datasets": "datasets"}


class _CheckoutPackages(importlib.abc.MetaPathFinder):
    """Finds ``lut_fast.pipelines`` / ``lut_fast.datasets`` in the checkout's top-level folders."""

    def __init__(self, repo: Path):
        self.repo = repo

    def find_spec(self, name, path=None, target=None):
        folder = MAPPED.get(name)
        if folder is None:
            return None
        init = self.repo / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def _yaml_stand_in() -> types.ModuleType:
    """Enough of PyYAML for config loading without files: safe_load of scalars / JSON, safe_dump as JSON."""
    mod = types.ModuleType("yaml")

    class YAMLError(ValueError):
        pass

    def safe_load(text):
        if hasattr(text, "read"):
            text = text.read()
        s = str(text).strip()
        if s in ("", "~", "null", "None"):
            return None
        low = s.lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        try:
            return json.loads(s)
        except ValueError:
            pass
        try:
            return float(s) if any(c in s for c in ".eE") else int(s)
        except ValueError:
            return s

    def safe_dump(obj, stream=None, **_kw):
        text = json.dumps(obj, indent=2) + "\n"
        if stream is None:
            return text
        stream.write(text)
        return None

    mod.YAMLError, mod.safe_load, mod.safe_dump = YAMLError, safe_load, safe_dump
    mod.__lut_fast_stand_in__ = True
    return mod


def bootstrap(repo: Path = REPO) -> list[str]:
    """Make this checkout importable as ``lut_fast`` (installed or not); returns what it had to do."""
    notes = []
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    try:
        found = importlib.util.find_spec("lut_fast.pipelines") is not None
    except ImportError:
        found = False
    if not found:
        sys.meta_path.insert(0, _CheckoutPackages(repo))
        notes.append("mapped lut_fast.pipelines / lut_fast.datasets from the checkout (package not installed)")
    try:
        import yaml  # noqa: F401
    except ImportError:
        # Only lut_fast.config needs it: import that module with the stand-in in place, then take the
        # stand-in away again, so that other packages (huggingface_hub via timm) still see no PyYAML.
        sys.modules["yaml"] = _yaml_stand_in()
        try:
            import lut_fast.config  # noqa: F401
        finally:
            del sys.modules["yaml"]
        notes.append("PyYAML missing: lut_fast.config uses a JSON-based stand-in")
    return notes


# ---------------------------------------------------------------- the check


def run_gpu_check(out: Path, budget_s: float = 420.0, quick: bool = False, boot_notes: list[str] | None = None) -> dict:
    import torch

    from lut_fast.errors import UserError

    cuda = torch.cuda.is_available()
    if not cuda and not quick:  # say so at once, not after minutes of CPU work
        raise UserError("no CUDA device is visible (torch.cuda.is_available() is False), so there is nothing to check; "
                        "--quick runs a tiny CPU smoke test of the preset itself")
    print(f"gpu check: {torch.cuda.get_device_name(0) if cuda else 'no GPU (quick CPU smoke test)'}, "
          f"budget {budget_s:.0f} s", flush=True)

    from lut_fast.bench.data import run_data_bench
    from lut_fast.bench.machine import machine_info, usable_cores
    from lut_fast.bench.report import new_report, plain_text, print_report, row, write_json
    from lut_fast.bench.train_step import Variant, add_time_ratios, run_train_bench

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "fp32")
    machine = machine_info()
    peak = machine.get("gpu_bf16_peak_tflops")
    workers = min(8, usable_cores())
    if quick:  # a smoke test of the preset itself: tiny model, few steps
        models = [("vit_tiny", 4)]
        sets = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=64",
                "model.decoder_depth=1", "model.decoder_num_heads=2", "model.head_hidden_dim=64"]
        img, patch, warmup, windows, spw = 32, 8, 1, 2, 1
        n_files, batch_data, data_windows, data_wb = 48, 4, 2, 1
        # An epoch must hold what a thread loader makes ahead three times (warm-up, before and after its
        # window: bench's interleave module), the window and a first batch; the torch loader's threads make
        # 2 per thread ahead, plus one in flight.
        n_files = max(n_files, batch_data * (3 * (2 * workers + 1) + data_wb + 1))
        compiled_cost = {"vit_tiny": 5.0}
    else:
        models = [("vit_small", 256), ("vit_base", 256)]
        sets = []
        img, patch, warmup, windows, spw = 224, 16, 3, 3, 5
        n_files, batch_data, data_windows, data_wb = 1024, 32, 3, 4  # about 1-2 minutes on a 16-core GPU host
        n_files = max(n_files, batch_data * (3 * (2 * workers + 1) + data_wb + 1))  # as above: 1,792 at 8 workers
        compiled_cost = {"vit_small": 75.0, "vit_base": 100.0}  # seconds, compile included (estimates)
    settings = dict(preset="gpu_check", quick=quick, budget_s=budget_s, precision=precision, img_size=img,
                    patch_size=patch, models=[m for m, _ in models], batch_sizes={m: b for m, b in models},
                    warmup_steps=warmup, windows=windows, steps_per_window=spw, sets=sets, data_workers=workers,
                    data_batch_size=batch_data, bootstrap=boot_notes or [], peak_tflops=peak)
    report = new_report("gpu", settings, machine)
    report["command"] = "docker/gpu_check.sh" if boot_notes is not None else report["command"]
    json_path = out / "gpu_check.json"

    def left() -> float:
        return budget_s - (time.perf_counter() - t0)

    def add(r: dict) -> None:
        report["results"].append(r)
        add_time_ratios(report["results"])
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_json(report, json_path)
        if r["status"] != "ok":
            status = r["status"]
        elif "images_per_sec" in r:
            status = f"{r['images_per_sec']:.0f} img/s"
        else:
            status = f"{r.get('host_cpu_ms_per_image')} host CPU ms/img"
        print(f"[{time.perf_counter() - t0:6.1f}s] {r.get('label', r['key'])}: {status}", flush=True)

    def train_rows(model: str, batch: int, methods: list[str], v: Variant, need: float) -> None:
        if left() < need:
            for m in methods:
                add(row("train", f"train/{model}/{m}/{v.label}", "skipped", f"time budget ({left():.0f}s left < {need:.0f}s)",
                        label=f"{model} {m} {v.label}", method=m, model=model))
            return
        rows = run_train_bench(model, methods, [v], dev, batch, img, patch, sets, warmup, windows, spw, peak)
        for r in rows:
            r["key"] = f"train/{model}/{r['key'].split('/', 1)[1]}"
            r["label"] = f"{model} {r['label']}"
            add(r)

    eager = Variant(False, precision, "auto", False)
    compiled = Variant(True, precision, "auto", False)

    # 1. eager train steps
    for model, batch in models:
        train_rows(model, batch, ["mae", "lut_sym", "lut_one_way"], eager, 30.0)

    # 2. data, every GPU-side path in one go: each backend's gpu-training configuration (the CPU side alone,
    #    pinned uint8 out), the cpu-only one and the official recipe for reference, the device stage
    #    (finish_batch: copy + view 2's photometric ops + normalisation on the GPU), decode_jpeg on CUDA.
    def data_rows() -> None:
        backend_data: dict[str, str | None] = {}
        if not quick:
            try:  # FFCV reads a .beton: convert the same photographs once (a few seconds on a GPU host's cores)
                from lut_fast.bench.data import resolve_data
                from lut_fast.datasets.ffcv_writer import write_beton

                beton = Path(tempfile.gettempdir()) / "lut_fast_bench" / f"photos-{n_files}.beton"
                if not beton.is_file():
                    write_beton(resolve_data(f"photos:{n_files}")[0], beton, workers=workers, overwrite=True)
                backend_data["ffcv"] = str(beton)
            except Exception as e:  # noqa: BLE001 - FFCV rows then say why they could not run
                print(f"FFCV conversion skipped: {type(e).__name__}: {e}", flush=True)
        results, info = run_data_bench(
            "torch" if quick else "all", f"photos:{n_files}", ["lut", "mae"], img, batch_data, workers, dev,
            data_windows, data_wb, n_files, backend_data=backend_data, warmup_rounds=1, device_decode=cuda,
            progress=lambda m: print(m, flush=True))
        report["settings"]["data"] = info
        for r in results:
            add(r)

    if left() > 40:
        try:
            data_rows()
        except Exception as e:  # noqa: BLE001 - the compiled train steps below still run
            add(row("data", "data/gpu_check", "failed", f"{type(e).__name__}: {str(e)[:300]}"))
    else:
        add(row("data", "data/torch/lut", "skipped", f"time budget ({left():.0f}s left)"))

    # 2b. does the loader keep the GPU fed: the torch loader's Batch stream alone at the trainer's batch size
    #     (process workers on all but two cores; threads, capped where the GIL caps them), and the host cost
    #     of the device stage with its profile (device_stage_profile.txt).
    def feed_rows() -> None:
        from lut_fast.bench.data import resolve_data
        from lut_fast.bench.feed import bench_loader_feed, profile_device_stage

        data = resolve_data(f"photos:{n_files}")[0]
        add(profile_device_stage(dev, feed_batch, img, out / "device_stage_profile.txt"))
        for recipe, kind, n in feed_loaders:
            if left() < 25:
                add(row("feed", f"feed/torch/{recipe}/{kind}-{n}", "skipped", f"time budget ({left():.0f}s left)"))
                continue
            add(bench_loader_feed(data, recipe, feed_batch, n, kind, dev, img, timed_batches=feed_timed))

    if quick:
        feed_batch, feed_timed, feed_loaders = 4, 4, [("lut", "threads", 2)]
    else:
        feed_batch, feed_timed = 256, 16
        procs = max(2, usable_cores() - 2)
        feed_loaders = [("lut", "processes", procs), ("lut", "threads", min(8, procs)), ("mae", "processes", procs)]
    if left() > 60:
        try:
            feed_rows()
        except Exception as e:  # noqa: BLE001 - the compiled train steps below still run
            add(row("feed", "feed/gpu_check", "failed", f"{type(e).__name__}: {str(e)[:300]}"))

    # 2c. end to end: the real train loop on the torch backend (ViT-B LUT, eager), whether it waits for data.
    if left() > 75:
        from lut_fast.bench.e2e import run_e2e

        e2e_model, e2e_batch = ("vit_tiny", 4) if quick else ("vit_base", 256)
        e2e_steps, e2e_warmup = (4, 1) if quick else (30, 8)
        try:
            r, _ = run_e2e("lut", e2e_model, "torch", f"photos:{n_files}", e2e_batch, feed_loaders[0][2], e2e_steps,
                           e2e_warmup, img, dev.type, precision, False, sets + [f"model.patch_size={patch}"])
            r["key"], r["label"] = f"e2e/torch/lut_sym/{e2e_model}", f"e2e {e2e_model} LUT symmetric, torch backend"
            add(r)
        except Exception as e:  # noqa: BLE001 - the compiled train steps below still run
            add(row("e2e", f"e2e/torch/lut_sym/{e2e_model}", "failed", f"{type(e).__name__}: {str(e)[:300]}"))
    else:
        add(row("e2e", "e2e/torch/lut_sym", "skipped", f"time budget ({left():.0f}s left)"))

    # 3. compiled train steps while the budget lasts: the larger model first (the paper's 1.18 is for ViT-B);
    #    a row starts only if its estimated cost (compile included) still fits in the budget.
    for model, batch in reversed(models):
        for m in ("mae", "lut_sym"):
            if quick and not cuda:  # inductor's C++ build on a small CPU takes minutes: not part of a smoke test
                add(row("train", f"train/{model}/{m}/{compiled.label}", "skipped", "quick smoke test without a GPU",
                        label=f"{model} {m} {compiled.label}", method=m, model=model))
                continue
            train_rows(model, batch, [m], compiled, compiled_cost[model])

    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_json(report, json_path)
    print_report(report)
    (out / "gpu_check.txt").write_text(plain_text(report))
    print(f"wrote {json_path} and {out / 'gpu_check.txt'} ({report['elapsed_s']}s)")
    return report


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="folder for gpu_check.json / .txt")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting measurements after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script (CPU is fine)")
    args = p.parse_args(argv)
    notes = bootstrap()
    from lut_fast.errors import UserError

    try:
        run_gpu_check(Path(args.out), budget_s=args.budget_s, quick=args.quick, boot_notes=notes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
