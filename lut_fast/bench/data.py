"""``bench data``: images/s and CPU-seconds per image of each backend's pipelines, against the decode floor.

For each backend: the LUT dual-view pipeline (one decode, SRC weak view + SRC
strong view) and the MAE single-view pipeline (RandomResizedCrop), read through
``pipelines.build_loader`` exactly as the trainer reads them. After
``warmup`` batches (plus as many as the loader may have prefetched), ``windows``
windows of ``window_batches`` batches each are timed; a row reports the median window. CPU time is that of this process and
its live worker processes (all threads), per image.

The floor: the raw JPEG decode rate of the same files (read into memory first,
so no I/O) with libjpeg-turbo, through Pillow and through
``torchvision.io.decode_jpeg``, on as many threads as the backends' workers,
decode only. Each backend row shows its rate as a fraction of the faster of
the two: how close the pipeline gets to "decoding is all it does".

On a GPU the run adds ``torch-gpu``: ``decode_jpeg`` on CUDA (nvJPEG) and the
views built with torch ops on the GPU (resize, SRC / RandomResizedCrop, the
batched photometric ops of ``pipelines.photometric``). It is a bench-side
pipeline (not one of the trainer's backends) that shows what GPU decoding buys.
"""

from __future__ import annotations

import gc
import io
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lut_fast.bench.measure import CpuClock, median, round_sig, synchronizer
from lut_fast.bench.report import row
from lut_fast.errors import UserError

RECIPES = {"lut": "LUT dual-view", "mae": "MAE single-view"}


# ---------------------------------------------------------------- data to measure on


def synthetic_jpegs(n: int = 256, size: tuple[int, int] = (500, 375), quality: int = 90, root: Path | None = None) -> Path:
    """ImageNet-like JPEGs (500x375, smooth structure + noise, about 60-90 KB) in an ImageFolder tree, cached.

    The built-in dataset's images are small (96-144 px); decode and resize
    costs at ImageNet sizes need ImageNet-sized files.
    """
    from lut_fast.datasets.builtin import cache_root

    root = root or cache_root()
    final = root / f"bench-synthetic-{n}-{size[0]}x{size[1]}-q{quality}"
    if (final / "train").is_dir() and sum(1 for _ in (final / "train").rglob("*.jpg")) == n:
        return final
    import shutil
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-synthetic-", dir=root))
    try:
        w, h = size
        for i in range(n):
            rng = np.random.default_rng([7, i])
            folder = tmp / "train" / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, 6, 8)).astype(np.float32))
            img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
            yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            freq = rng.uniform(0.02, 0.15, size=2)
            pattern = 40 * np.sin(freq[0] * xx + freq[1] * yy + rng.uniform(0, 6.3))
            arr = img.numpy().transpose(1, 2, 0) + pattern[..., None] + rng.normal(0, 12, size=(h, w, 3))
            _save_jpeg(np.clip(arr, 0, 255).astype(np.uint8), folder / f"img_{i:05d}.jpg", quality)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _save_jpeg(arr: np.ndarray, path: Path, quality: int) -> None:
    try:
        from PIL import Image

        Image.fromarray(arr).save(path, quality=quality)
    except ImportError:  # a machine without Pillow (torchvision encodes with libjpeg too)
        from torchvision.io import encode_jpeg, write_file

        write_file(str(path), encode_jpeg(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), quality=quality))


def resolve_data(data: str | None) -> tuple[str, str]:
    """(ImageFolder path, description) for ``--data``: a path, ``builtin`` (default) or ``synthetic[:N]``."""
    if data in (None, "", "builtin"):
        from lut_fast.datasets.builtin import builtin_path

        return str(builtin_path()), "builtin"
    if data.startswith("synthetic"):
        _, _, n = data.partition(":")
        try:
            count = int(n) if n else 256
        except ValueError:
            raise UserError(f"--data synthetic:N takes a number of images, got {data!r}") from None
        return str(synthetic_jpegs(count)), f"synthetic:{count} (500x375 JPEG q90)"
    if not Path(data).expanduser().exists():
        raise UserError(f"data not found: {data}")
    return str(Path(data).expanduser()), data


def image_files(data: str, limit: int) -> list[str]:
    from lut_fast.datasets.imagefolder import scan_image_folder

    samples = scan_image_folder(data, "train").samples
    files = [p for p, _ in samples if p.lower().endswith((".jpg", ".jpeg"))]
    if not files:
        raise UserError(f"no JPEG files under {data}: the decode floor needs JPEGs")
    step = max(1, len(files) // limit)
    return files[::step][:limit]


# ---------------------------------------------------------------- the floor: decode only


def _decoders() -> dict[str, Callable[[bytes], object]]:
    out: dict[str, Callable[[bytes], object]] = {}
    try:
        from PIL import Image, features

        turbo = features.version("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None

        def pil_decode(b: bytes):
            img = Image.open(io.BytesIO(b))
            img.load()
            return img

        out[f"pillow (libjpeg-turbo {turbo})" if turbo else "pillow (libjpeg)"] = pil_decode
    except ImportError:
        pass
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        def tv_decode(b: bytes):
            return decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)

        out["torchvision.io.decode_jpeg"] = tv_decode
    except ImportError:
        pass
    return out


def decode_floor(files: list[str], threads: int, windows: int, images_per_window: int) -> list[dict]:
    """Decode-only rate of ``files`` (bytes in memory) on ``threads`` threads, per decoder: one row each."""
    blobs = [Path(f).read_bytes() for f in files]
    threads = max(1, threads)
    rows = []
    for name, decode in _decoders().items():
        key = "data/floor/" + name.split(" ")[0]
        try:
            with ThreadPoolExecutor(threads) as pool:
                cycle = itertools.cycle(blobs)
                list(pool.map(decode, blobs[: max(threads * 2, 8)]))  # warm-up
                rates, cpu = [], []
                for _ in range(windows):
                    chunk = [next(cycle) for _ in range(images_per_window)]
                    clock = CpuClock().start()
                    list(pool.map(decode, chunk, chunksize=max(1, len(chunk) // (4 * threads))))
                    wall, cpu_s = clock.stop()
                    rates.append(len(chunk) / wall)
                    cpu.append(cpu_s / len(chunk))
        except Exception as e:  # noqa: BLE001
            rows.append(row("data", key, "failed", f"{type(e).__name__}: {e}", label=f"floor: {name}"))
            continue
        ips = median(rates)
        rows.append(row(
            "data", key, label=f"floor: {name}, {threads} thr", backend="floor", decoder=name, threads=threads,
            images_per_sec=round_sig(ips), images_per_sec_windows=[round_sig(r) for r in rates],
            cpu_ms_per_image=round_sig(median(cpu) * 1000), cores_busy=round_sig(median(cpu) * ips),
            files=len(blobs), mean_file_kb=round_sig(sum(map(len, blobs)) / len(blobs) / 1024),
        ))
    return rows


# ---------------------------------------------------------------- backends through build_loader


def _endless(loader) -> Iterator:
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def prefetch_depth(workers: int) -> int:
    """Batches a loader may hold ready ahead of the consumer (torch: 4 per worker; DALI 2, FFCV 3), plus 2.

    They are read during warm-up too: timing windows that drained a full
    prefetch queue would report the rate of taking ready batches, not of making them.
    """
    return 4 * max(1, workers) + 2


def bench_backend(backend: str, data: str, recipe: str, img_size: int, batch_size: int, workers: int,
                  device: torch.device, warmup: int, windows: int, window_batches: int, options: dict | None = None) -> dict:
    """One backend, one recipe: median images/s and CPU ms/image over ``windows`` windows."""
    from lut_fast.pipelines import build_loader
    from lut_fast.pipelines.spec import AugSpec

    key = f"data/{backend}/{recipe}"
    label = f"{backend} {RECIPES[recipe]}"
    spec = AugSpec(recipe=recipe, img_size=img_size)
    sync = synchronizer(device)
    loader = it = None
    try:
        t0 = time.perf_counter()
        loader = build_loader(backend, data, spec, batch_size, device=device, num_workers=workers, seed=0,
                              **(options or {}))
        it = _endless(loader)
        for _ in range(warmup + prefetch_depth(workers)):
            next(it)
        sync()
        startup_s = time.perf_counter() - t0
        rates, cpu = [], []
        for _ in range(windows):
            clock = CpuClock().start()
            n = 0
            for _ in range(window_batches):
                b = next(it)
                n += b.size
            sync()
            wall, cpu_s = clock.stop()
            rates.append(n / wall)
            cpu.append(cpu_s / n)
        shape = list(b.view1.shape)
        two = b.view2 is not None
    except UserError as e:
        return row("data", key, "unavailable", str(e), label=label, backend=backend, recipe=recipe)
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("lut_fast.pipelines."):
            why = f"the {backend} backend's module ({e.name}) is not in this checkout"
        else:
            why = f"the {backend} backend needs a module that is not installed: {e.name}"
        return row("data", key, "unavailable", why, label=label, backend=backend, recipe=recipe)
    except Exception as e:  # noqa: BLE001 - one backend failing must not stop the others
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return row("data", key, "failed", f"{type(e).__name__}: {msg[:300]}", label=label, backend=backend, recipe=recipe)
    finally:
        del it, loader
        gc.collect()
    ips = median(rates)
    return row(
        "data", key, label=label, backend=backend, recipe=recipe, pipeline=RECIPES[recipe],
        images_per_sec=round_sig(ips), images_per_sec_windows=[round_sig(r) for r in rates],
        cpu_ms_per_image=round_sig(median(cpu) * 1000), cores_busy=round_sig(median(cpu) * ips),
        startup_s=round_sig(startup_s), batch_shape=shape, two_views=two, workers=workers, batch_size=batch_size,
    )


# ---------------------------------------------------------------- torch ops on the device (GPU decode)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]


def device_views(images: list[torch.Tensor], spec, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 CHW images on any device -> (view1, view2) float 0..255 batches, built with torch ops there."""
    from lut_fast.pipelines import photometric
    from lut_fast.pipelines.torch_backend import rrc_box

    s = spec.img_size
    if spec.recipe == "mae":
        outs = []
        for img in images:
            left, top, w, h = rrc_box(img.shape[2], img.shape[1], spec, rng)
            v = _resize(img[:, top : top + h, left : left + w].float(), s, s)
            outs.append(v.flip(-1) if rng.uniform() < spec.flip_p else v)
        return torch.stack(outs).clamp_(0, 255), None
    v1, v2 = [], []
    pad = spec.src_padding
    for img in images:
        h, w = img.shape[1:]
        scale = s / min(h, w)
        base = _resize(img.float(), max(s, round(h * scale)), max(s, round(w * scale)))
        if pad:
            base = torch.nn.functional.pad(base[None], (pad, pad, pad, pad), mode=spec.src_padding_mode)[0]
        for out in (v1, v2):
            top = int(rng.integers(0, base.shape[1] - s + 1))
            left = int(rng.integers(0, base.shape[2] - s + 1))
            crop = base[:, top : top + s, left : left + s]
            out.append(crop.flip(-1) if rng.uniform() < spec.flip_p else crop)
    view1 = torch.stack(v1).clamp_(0, 255)
    params = photometric.sample_params(spec, len(images), torch.Generator().manual_seed(int(rng.integers(2**62))))
    view2 = photometric.apply_strong(torch.stack(v2).clamp_(0, 255).div_(255.0), params, spec).mul_(255.0)
    return view1, view2


def bench_device_decode(files: list[str], recipe: str | None, img_size: int, batch_size: int, device: torch.device,
                        warmup: int, windows: int, window_batches: int) -> dict:
    """``decode_jpeg`` on ``device`` for whole batches; ``recipe=None``: decode only (the device's floor)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from lut_fast.pipelines.batch import normalize_uint8
    from lut_fast.pipelines.spec import AugSpec

    name = "torch-gpu" if device.type == "cuda" else f"torch-{device.type}-ops"
    key = f"data/{name}/{recipe or 'decode'}"
    label = f"{name} {RECIPES[recipe] if recipe else 'decode only (floor)'}"
    spec = AugSpec(recipe=recipe or "lut", img_size=img_size)
    blobs = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
    cycle = itertools.cycle(blobs)
    rng = np.random.default_rng(0)
    sync = synchronizer(device)

    def one_batch() -> int:
        chunk = [next(cycle) for _ in range(batch_size)]
        imgs = decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
        if recipe is not None:
            v1, v2 = device_views(imgs, spec, rng)
            normalize_uint8(v1, spec, device, False)
            if v2 is not None:
                normalize_uint8(v2, spec, device, False)
        return len(chunk)

    try:
        for _ in range(warmup):
            one_batch()
        sync()
        rates, cpu = [], []
        for _ in range(windows):
            clock = CpuClock().start()
            n = sum(one_batch() for _ in range(window_batches))
            sync()
            wall, cpu_s = clock.stop()
            rates.append(n / wall)
            cpu.append(cpu_s / n)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return row("data", key, "failed", f"{type(e).__name__}: {msg[:300]}", label=label, backend=name)
    ips = median(rates)
    return row(
        "data", key, label=label, backend=name, recipe=recipe or "decode", decoder=f"torchvision.io.decode_jpeg({device.type})",
        images_per_sec=round_sig(ips), images_per_sec_windows=[round_sig(r) for r in rates],
        cpu_ms_per_image=round_sig(median(cpu) * 1000), cores_busy=round_sig(median(cpu) * ips), batch_size=batch_size,
        note="bench-side pipeline, not a trainer backend",
    )


# ---------------------------------------------------------------- the whole run


def select_backends(backend: str) -> tuple[list[str], list[dict]]:
    """(backends to run, 'unavailable' rows with install hints) for ``--backend torch|dali|ffcv|all``."""
    from lut_fast.pipelines import BACKENDS, require_backend

    wanted = list(BACKENDS) if backend == "all" else [backend]
    run, missing = [], []
    for b in wanted:
        try:
            require_backend(b)
        except UserError as e:
            if backend != "all" and b not in BACKENDS:
                raise
            missing.append(row("data", f"data/{b}/lut", "unavailable", str(e), label=f"{b}", backend=b))
            continue
        run.append(b)
    return run, missing


def run_data_bench(backend: str, data: str | None, recipes: list[str], img_size: int, batch_size: int, workers: int,
                   device: torch.device, warmup: int, windows: int, window_batches: int, floor_files: int,
                   backend_data: dict[str, str | None] | None = None, device_decode: bool | None = None,
                   on_row: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:
    """Rows for the floor, each backend x recipe, and (on GPU) the device-decode pipeline; plus data info."""
    for r in recipes:
        if r not in RECIPES:
            raise UserError(f"unknown pipeline {r!r}; choose lut and/or mae")
    path, described = resolve_data(data)
    files = image_files(path, floor_files)
    results: list[dict] = []

    def add(r: dict) -> None:
        results.append(r)
        if on_row is not None:
            on_row(r)

    threads = max(1, workers)
    for r in decode_floor(files, threads, windows, max(batch_size * window_batches, 4 * threads)):
        add(r)
    floor = max((r["images_per_sec"] for r in results if r["status"] == "ok"), default=None)

    run, missing = select_backends(backend)
    for r in missing:
        add(r)
    for b in run:
        src = (backend_data or {}).get(b) or path
        for recipe in recipes:
            add(bench_backend(b, src, recipe, img_size, batch_size, workers, device, warmup, windows, window_batches))

    if device_decode is None:
        device_decode = device.type == "cuda"
    if device_decode:
        add(bench_device_decode(files, None, img_size, batch_size, device, warmup, windows, window_batches))
        for recipe in recipes:
            add(bench_device_decode(files, recipe, img_size, batch_size, device, warmup, windows, window_batches))

    for r in results:
        if r["status"] == "ok" and floor and not r["key"].startswith("data/floor/"):
            r["frac_of_decode_floor"] = round_sig(r["images_per_sec"] / floor)
    info = {"data": described, "data_path": path, "floor_files": len(files), "decode_floor_images_per_sec": floor,
            "floor_threads": threads}
    return results, info
