"""``bench data``: images/s and CPU ms per image of each backend's pipelines, against the decode floor.

For each backend (torch, DALI, FFCV) and recipe (LUT dual view, MAE single
view), two configurations, read through ``pipelines.build_loader`` exactly as
the trainer reads them:

* **gpu-training**: ``photometric_on="device"``, timing ``loader.raw_batches()``:
  the CPU side alone, uint8 views out (view 2's jitter / 3-augment op and the
  normalisation are the device's work in a GPU run; ``device-stage`` rows time
  that part on a GPU).
* **cpu-only**: ``photometric_on="loader"``, the full ``iter(loader)`` on the
  CPU: every op on the CPU, normalised float32 views out, as CPU training needs.

CPU time is that of this process and its live worker processes, all threads.

The floor: decode only, of the same files (read into memory first, so no
I/O), on as many threads as the loaders have workers, with every decoder
installed (simplejpeg, ``torchvision.io.decode_jpeg``, Pillow). The fastest
decoder by wall clock is the floor's img/s and the least CPU per image its CPU
figure; each pipeline row gives its share of both. For converted data the
floor of the JPEGs stored in it is measured too (that is what the backend
decodes) and, when the converter recorded its source folder, the floor of the
original files.

The resize's bound (``resize-bound`` rows, LUT): each JPEG decoded with
simplejpeg, its shorter side resized to S once with the filter a backend's
LUT pipeline uses (``RESIZE_OF``: torch's antialiased bicubic, the area
filter of DALI's CPU graph, or FFCV's area filter after a DCT-domain
downscale in the decoder) and both SRC windows cut, on the same
threads, with no loader, batch or copy around it. No LUT pipeline resizing
with that filter can spend less CPU on those files, so the bound's share of
the floor is the most it can reach; each LUT gpu-training row gives that
share (``resize_bound_frac_of_floor_cpu``) and its distance to the bound,
the CPU its loader adds (``loader_cpu_ms_per_image``).

The reference: the official LUT recipe (``official_recipe.py``: per-view
torchvision/PIL transforms in a DataLoader), CPU-only; each LUT row gives its
ratio to it.

Everything is timed interleaved, window by window (``interleave.py``), with
start-up and epoch boundaries kept out of the windows and reported apart.

On a GPU the run adds ``device-stage`` rows (``finish_batch`` with view 2's
photometric ops on the device) and ``torch-gpu`` rows: ``decode_jpeg`` on CUDA
(nvJPEG) with the views built by torch ops on the GPU, a bench-side pipeline
(not one of the trainer's backends) that shows what GPU decoding buys.
"""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lut_fast.bench.interleave import FloorSubject, StreamSubject, Subject, run_interleaved
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

    def write(tmp: Path) -> None:
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

    from lut_fast.bench.photos import cached_jpeg_tree

    return cached_jpeg_tree(final, n, write)


def _save_jpeg(arr: np.ndarray, path: Path, quality: int) -> None:
    try:
        from PIL import Image

        Image.fromarray(arr).save(path, quality=quality)
    except ImportError:  # a machine without Pillow (torchvision encodes with libjpeg too)
        from torchvision.io import encode_jpeg, write_file

        write_file(str(path), encode_jpeg(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), quality=quality))


def _image_count(data: str, default: int) -> int:
    """N of ``synthetic:N`` / ``photos:N`` (``default`` without one)."""
    name, _, n = data.partition(":")
    try:
        return int(n) if n else default
    except ValueError:
        raise UserError(f"--data {name}:N takes a number of images, got {data!r}") from None


def resolve_data(data: str | None) -> tuple[str, str]:
    """(ImageFolder path, description) for ``--data``: a path, ``builtin``, ``synthetic[:N]`` or ``photos[:N]``."""
    if data in (None, "", "builtin"):
        from lut_fast.datasets.builtin import builtin_path

        return str(builtin_path()), "builtin"
    if data.startswith("synthetic"):
        count = _image_count(data, 256)
        return str(synthetic_jpegs(count)), f"synthetic:{count} (500x375 JPEG q90)"
    if data.startswith("photos"):
        from lut_fast.bench.photos import photo_jpegs, source_photos

        count = _image_count(data, 1024)
        folder = photo_jpegs(count)
        return str(folder), f"photos:{count} (crops of {len(source_photos())} photographs, shorter side 300-500, JPEG q85-90)"
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
    """Every JPEG decoder installed here, by name: simplejpeg (optional), torchvision, Pillow."""
    out: dict[str, Callable[[bytes], object]] = {}
    try:
        import simplejpeg

        reused = threading.local()

        def sj_decode(b: bytes):
            # Into memory each thread reuses: a fresh array per image made the floor measure the allocator
            # too. In a process whose loaders had changed its state (FFCV's threads, a new set per epoch),
            # the same decodes cost 0.64 ms per image in some rounds and 1.3 in others.
            h, w = simplejpeg.decode_jpeg_header(b)[:2]
            buf = getattr(reused, "buf", None)
            if buf is None or len(buf) < 3 * h * w:
                buf = reused.buf = bytearray(3 * h * w)
            return simplejpeg.decode_jpeg(b, colorspace="RGB", buffer=buf)

        out[f"simplejpeg {getattr(simplejpeg, '__version__', '')}".strip()] = sj_decode
    except ImportError:
        pass
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        def tv_decode(b: bytes):
            return decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)

        out["torchvision.io.decode_jpeg"] = tv_decode
    except ImportError:
        pass
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
    return out


def decoder_key(name: str) -> str:
    return name.split(" ")[0].split(".")[0]  # simplejpeg | torchvision | pillow


def _spread(items: list, limit: int) -> list:
    step = max(1, len(items) // max(1, limit))
    return items[::step][:limit]


def stored_jpegs(backend: str, data: str, limit: int) -> list[bytes] | None:
    """The JPEG bytes a backend's converted data holds (up to ``limit``, spread over the file), or None.

    None for a plain image folder (its files are the floor already) and for
    images stored raw (FFCV's raw / smart write modes: nothing to decode). An
    image folder written by ``convert folder`` gives its own JPEGs.
    """
    from lut_fast.pipelines import formats

    try:
        source = formats.detect(data)
    except UserError:
        return None
    if source.kind == "imagefolder":
        meta = stored_info(data)
        if not meta or meta.get("format") != "imagefolder":
            return None
        return [Path(f).read_bytes() for f in image_files(data, limit)]
    if source.kind == "shards":
        import tarfile

        from lut_fast.datasets.dali_writer import IMAGE_EXT, read_manifest

        blobs: list[bytes] = []
        for shard in read_manifest(source.path)["shards"]:
            with tarfile.open(source.path / shard["tar"]) as tar:
                for member in tar:
                    if member.name.endswith("." + IMAGE_EXT):
                        blobs.append(tar.extractfile(member).read())
        return _spread(blobs, limit) or None
    if source.kind == "beton":
        from ffcv.reader import Reader

        reader = Reader(str(source.path))
        meta = reader.metadata["image"] if "image" in (reader.metadata.dtype.names or ()) else reader.metadata["f0"]
        sizes = {int(p): int(s) for p, s in zip(reader.alloc_table["ptr"], reader.alloc_table["size"])}
        picks = [i for i in range(len(meta)) if int(meta[i]["mode"]) == 0]  # 0: jpg, 1: raw
        blobs = []
        with open(source.path, "rb") as f:
            for i in _spread(picks, limit):
                ptr = int(meta[i]["data_ptr"])
                f.seek(ptr)
                blobs.append(f.read(sizes[ptr]))
        return blobs or None
    return None


def stored_info(data: str) -> dict | None:
    """What ``lut-fast convert`` recorded about converted data (shorter side, source, ...), if it did."""
    from lut_fast.pipelines import formats

    reader = getattr(formats, "stored_metadata", None)
    if reader is None:
        return None
    try:
        return reader(data)
    except UserError:
        return None


def _split_root(folder: str) -> str:
    """The folder whose images a loader reads for split train (a split root and its train/ are one file set)."""
    from lut_fast.datasets.imagefolder import resolve_split

    return str(resolve_split(folder, "train").resolve())


def floor_subjects(name: str, blobs: list[bytes], threads: int, images: int) -> list[tuple[Subject, dict]]:
    """One decode-only subject per installed decoder, over the blobs of one file set."""
    out = []
    mean_kb = round_sig(sum(map(len, blobs)) / len(blobs) / 1024)
    for dec, fn in _decoders().items():
        key = f"data/floor/{name}/{decoder_key(dec)}"
        fields = dict(label=f"floor ({name}): {dec}, {threads} thr", backend="floor", file_set=name, decoder=dec,
                      threads=threads, files=len(blobs), mean_file_kb=mean_kb, configuration="decode only")
        out.append((FloorSubject(key, blobs, fn, threads, images), fields))
    return out


# ---------------------------------------------------------------- the bound a LUT pipeline's resize sets

# How each backend's LUT pipeline brings the shorter side to S on the CPU: torch's antialiased bicubic
# (torch_backend, the reference's filter); the area filter of ``area_resize`` (DALI's CPU graph); the same after
# libjpeg-turbo's DCT-domain downscale by 2, 4 or 8 where the shorter side stays >= S (FFCV's decoder,
# ``area_resize.jpeg_scale_denominator``).
RESIZE_OF = {"torch": "bicubic", "dali": "area", "ffcv": "area+dct"}


def _src_work(filter_: str, spec) -> Callable[[bytes], object]:
    """decode -> SRC's one shorter-side resize -> its two windows (``spec``'s size, padding and flip
    probability), for one JPEG, on memory each thread reuses."""
    import simplejpeg

    from lut_fast.pipelines.area_resize import jpeg_scale_denominator, resize_area, shorter_side_size
    from lut_fast.pipelines.src_windows import src_views_hwc
    from lut_fast.pipelines.torch_backend import resize_into

    s, pad, local = spec.img_size, spec.src_padding, threading.local()

    def grown(name: str, n: int, dtype) -> np.ndarray:
        buf = getattr(local, name, None)
        if buf is None or buf.size < n:
            buf = np.empty(n, dtype)
            setattr(local, name, buf)
        return buf[:n]

    def work(blob: bytes):
        if not hasattr(local, "rng"):  # this thread's first image (one torch thread, as in the torch backend's pool)
            local.rng = np.random.default_rng(threading.get_ident())
            local.views = np.empty((2, s, s, 3), np.uint8)
            torch.get_num_threads()  # torch's per-thread lazy set-up first, or it would undo the next line later
            torch.set_num_threads(1)
        h, w = simplejpeg.decode_jpeg_header(blob)[:2]
        d = jpeg_scale_denominator(min(h, w), s) if filter_ == "area+dct" else 1
        hd, wd = -(-h // d), -(-w // d)
        img = simplejpeg.decode_jpeg(blob, colorspace="RGB", min_height=hd, min_width=wd, min_factor=d,
                                     buffer=grown("decoded", 3 * hd * wd, np.uint8))
        nh, nw = shorter_side_size(h, w, s)
        base = img
        if (nh, nw) != (h, w):  # stored at the training size: no resize, as in the loaders
            base = grown("resized", 3 * nh * nw, np.uint8).reshape(nh, nw, 3)
            if filter_ != "bicubic":
                resize_area(img, 0, hd, 0, wd, base, grown("row", 3 * wd, np.float32))
            else:
                resize_into(torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(base).permute(2, 0, 1),
                            filter_, channels_last=True)
        u = local.rng.random(6)
        n_top, n_left = nh + 2 * pad - s + 1, nw + 2 * pad - s + 1
        at = [(min(int(u[3 * v] * n_top), n_top - 1), min(int(u[3 * v + 1] * n_left), n_left - 1), u[3 * v + 2] < spec.flip_p)
              for v in range(2)]
        src_views_hwc(local.views[0], local.views[1], base, pad, *at[0], *at[1])
        return local.views

    return work


class _OneTorchThreadSubject(FloorSubject):
    """A ``FloorSubject`` whose work sets torch's thread count to one in each pool thread: put the process-wide
    default (which that also sets) back once the warm-up has started them."""

    def start(self) -> None:
        mine = torch.get_num_threads()
        try:
            super().start()
        finally:
            torch.set_num_threads(mine)


def resize_bound_subjects(name: str, blobs: list[bytes], filters: list[str], threads: int, images: int,
                          spec) -> list[tuple[Subject, dict]]:
    """Per resize (``RESIZE_OF``): each JPEG decoded (simplejpeg), its shorter side resized to S once and both
    SRC windows cut (``spec``, an ``AugSpec``), with nothing around that: no loader, no batch, no copy, every
    buffer reused.

    That is the least CPU per image a LUT pipeline that resizes with the filter can spend on these files, so
    its share of the decode floor is the most such a pipeline can reach, and a pipeline row's distance to
    it is its loader's own cost. Needs simplejpeg and numba (the kernels); none without them."""
    try:
        import numba  # noqa: F401
        import simplejpeg  # noqa: F401
    except ImportError:
        return []
    out = []
    for filter_ in filters:
        key = f"data/resize-bound/{name}/{filter_}"
        fields = dict(label=f"bound ({name}): decode + {filter_} resize + 2 windows, no loader, {threads} thr",
                      backend="resize-bound", file_set=name, filter=filter_, threads=threads, files=len(blobs),
                      configuration="decode, SRC resize and windows only")
        out.append((_OneTorchThreadSubject(key, blobs, _src_work(filter_, spec), threads, images), fields))
    return out


# ---------------------------------------------------------------- pipelines: the two configurations


CONFIGURATIONS = {
    # name: (photometric_on, what is iterated, delivery device on a CPU machine)
    "gpu-training": "device",  # loader.raw_batches(): the CPU side alone, uint8 out; the rest runs on the GPU
    "cpu-only": "loader",  # iter(loader) on device cpu: every op on the CPU, normalised float32 out
}


def ready_depth(loader) -> int:
    """Batches a loader may have made ahead of its consumer (read untimed before a window), plus one in flight."""
    dl = getattr(loader, "loader", None)
    if isinstance(dl, torch.utils.data.DataLoader):
        return (dl.prefetch_factor or 0) * dl.num_workers + 1
    for attr in ("prefetch", "batches_ahead"):
        n = getattr(loader, attr, None) or getattr(dl, attr, None)
        if isinstance(n, int):
            return n + 1
    return 4


def _count(batch) -> int:
    if isinstance(batch, (tuple, list)):
        return int(batch[0].shape[0])
    return int(batch.size)


def pipeline_subject(backend: str, data: str, recipe: str, configuration: str, img_size: int, batch_size: int,
                     workers: int, device: torch.device) -> StreamSubject:
    from lut_fast.pipelines import build_loader
    from lut_fast.pipelines.spec import AugSpec

    spec = AugSpec(recipe=recipe, img_size=img_size)
    photometric_on = CONFIGURATIONS[configuration]
    target = device if configuration == "gpu-training" and device.type == "cuda" else torch.device("cpu")

    def build():
        return build_loader(backend, data, spec, batch_size, device=target, num_workers=workers, seed=0,
                            photometric_on=photometric_on)

    def batches(loader):
        return loader.raw_batches() if configuration == "gpu-training" else loader

    return StreamSubject(f"data/{backend}/{recipe}/{configuration}", build, batches, _count, depth_of=ready_depth)


def official_subject(data: str, img_size: int, batch_size: int, workers: int) -> StreamSubject:
    from lut_fast.bench.official_recipe import OfficialLoader
    from lut_fast.datasets.imagefolder import scan_image_folder
    from lut_fast.pipelines.spec import AugSpec

    spec = AugSpec(recipe="lut", img_size=img_size)

    def build():
        return OfficialLoader(scan_image_folder(data, "train").samples, spec, batch_size, workers)

    return StreamSubject("data/official/lut/cpu-only", build, lambda loader: loader, _count, depth_of=ready_depth)


def describe_failure(backend: str, e: BaseException) -> tuple[str, str]:
    """(status, reason) for a subject that could not run: 'unavailable' for what this machine lacks."""
    if isinstance(e, UserError):
        return "unavailable", str(e)
    if isinstance(e, ModuleNotFoundError):
        if (e.name or "").startswith("lut_fast.pipelines."):
            return "unavailable", f"the {backend} backend's module ({e.name}) is not in this checkout"
        return "unavailable", f"the {backend} backend needs a module that is not installed: {e.name}"
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    msg = lines[0] if lines else ""
    if len(lines) > 1:  # a traced error (DALI's graph, numba) says what went wrong on its last line
        msg = f"{msg[:150]} ... {lines[-1][:300]}"
    return "failed", f"{type(e).__name__}: {msg[:450]}"


# ---------------------------------------------------------------- the device stage (finish_batch)


def bench_device_stage(recipe: str, img_size: int, batch_size: int, device: torch.device, warmup: int, windows: int,
                       window_batches: int) -> dict:
    """``finish_batch`` on ``device`` for uint8 batches with view 2's photometric ops still to do.

    What a GPU run adds on the device per batch: the copy, view 2's jitter
    and 3-augment op (``photometric.apply_strong``), normalisation. The input
    batches are made once on the host (pinned on CUDA), so only the device stage is timed.
    """
    from lut_fast.pipelines import photometric
    from lut_fast.pipelines.batch import RawBatch, finish_batch
    from lut_fast.pipelines.spec import AugSpec

    key = f"data/device-stage/{recipe}"
    label = f"device stage ({device.type}): copy{' + view-2 photometric' if recipe == 'lut' else ''} + normalise"
    spec = AugSpec(recipe=recipe, img_size=img_size)
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, 3, img_size, img_size)
    pin = device.type == "cuda"

    def u8():
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        return x.pin_memory() if pin else x

    raw = RawBatch(view1=u8(), view2=u8() if recipe == "lut" else None, labels=torch.zeros(batch_size, dtype=torch.long),
                   strong_params=photometric.sample_params(spec, batch_size, g) if recipe == "lut" else None)
    sync = synchronizer(device)
    try:
        for _ in range(warmup):
            finish_batch(raw, spec, device, False)
        sync()
        rates, cpu = [], []
        for _ in range(windows):
            clock = CpuClock().start()
            for _ in range(window_batches):
                out = finish_batch(raw, spec, device, False)
            sync()
            wall, cpu_s = clock.stop()
            n = batch_size * window_batches
            rates.append(n / wall)
            cpu.append(cpu_s / n)
    except Exception as e:  # noqa: BLE001
        status, reason = describe_failure("device-stage", e)
        return row("data", key, status, reason, label=label, backend="device-stage", recipe=recipe)
    return row("data", key, label=label, backend="device-stage", recipe=recipe, configuration="device stage",
               device=device.type, images_per_sec=round_sig(median(rates)), images_per_sec_windows=[round_sig(r) for r in rates],
               cpu_ms_per_image=round_sig(median(cpu) * 1000), batch_shape=list(out.view1.shape),
               dtype=str(out.view1.dtype).replace("torch.", ""))


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
    """(backends to run, 'unavailable' rows with install hints) for ``--backend torch|dali|ffcv|all`` or a comma list."""
    from lut_fast.pipelines import BACKENDS, require_backend

    wanted = list(BACKENDS) if backend == "all" else [b.strip() for b in backend.split(",") if b.strip()]
    run, missing = [], []
    for b in wanted:
        try:
            require_backend(b)
        except UserError as e:
            if b not in BACKENDS:
                raise
            missing.append(row("data", f"data/{b}/lut", "unavailable", str(e), label=f"{b}", backend=b))
            continue
        run.append(b)
    return run, missing


# Rough per-thread rates for the duration estimate printed before a run (2-core machine, ImageNet-sized JPEGs).
_GUESS_IPS_PER_THREAD = {"floor": 300.0, "bound": 200.0, "pipeline": 25.0, "official": 12.0}


def estimate_seconds(kinds: list[str], rounds: int, window_images: int, threads: int) -> float:
    """A rough duration: each subject's windows at a guessed rate, plus ~1.5 s per window of settling and epochs."""
    per_round = sum(window_images / (_GUESS_IPS_PER_THREAD[k] * max(1, threads)) + 1.5 for k in kinds)
    return rounds * per_round + 5.0 * sum(k != "floor" for k in kinds)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _summary(samples: list[tuple[int, float, float]]) -> dict:
    rates = [n / wall for n, wall, _ in samples]
    cpu = [c / n for n, _, c in samples]
    ips, cpu_s = median(rates), median(cpu)
    return dict(images_per_sec=round_sig(ips), images_per_sec_windows=[round_sig(r) for r in rates],
                cpu_ms_per_image=round_sig(cpu_s * 1000), cpu_ms_per_image_windows=[round_sig(c * 1000) for c in cpu],
                cores_busy=round_sig(cpu_s * ips), windows=len(samples))


def _batch_fields(batch) -> dict:
    if batch is None:
        return {}
    if isinstance(batch, (tuple, list)):
        v1, v2 = batch[0], batch[1]
    else:
        v1, v2 = batch.view1, batch.view2
    return dict(batch_shape=list(v1.shape), dtype=str(v1.dtype).replace("torch.", ""), two_views=v2 is not None)


# The project's throughput goals for the pipelines, per configuration: the least share of the decode floor of
# the files a backend reads (judged on CPU ms per image, the figure a shared machine does not distort) and,
# for cpu-only LUT rows, the least ratio to the official recipe.
GOALS = {"gpu-training": {"floor_share": 0.70}, "cpu-only": {"floor_share": 0.35, "vs_official_lut": 5.0}}


def add_goal(r: dict) -> None:
    """Set ``goal`` (the targets) and ``goal_met`` on a pipeline row, and a short ``note`` for the table."""
    goal = GOALS.get(r.get("configuration", ""))
    if goal is None or r.get("backend") in ("official", "floor", None):
        return
    share = r.get("frac_of_decode_floor_cpu")
    checks = {"floor_share": share is not None and share >= goal["floor_share"]}
    target = {"floor_share": goal["floor_share"]}
    if r.get("recipe") == "lut" and "vs_official_lut" in goal:
        target["vs_official"] = goal["vs_official_lut"]
        checks["vs_official"] = (r.get("vs_official_cpu") or 0) >= goal["vs_official_lut"]
    r["goal"], r["goal_met"] = target, all(checks.values())
    missed = [f"{target['floor_share']:.0%} of floor CPU" if not checks["floor_share"] else None,
              f"{target.get('vs_official', 0):g}x official" if not checks.get("vs_official", True) else None]
    r["note"] = "goal met" if r["goal_met"] else "goal: " + ", ".join(m for m in missed if m)


def run_data_bench(backend: str, data: str | None, recipes: list[str], img_size: int, batch_size: int, workers: int,
                   device: torch.device, windows: int, window_batches: int, floor_files: int,
                   backend_data: dict[str, str | None] | None = None,
                   configurations: tuple[str, ...] = ("gpu-training", "cpu-only"), official: bool = True,
                   warmup_rounds: int = 1, device_decode: bool | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Every row of ``bench data`` (see the module doc), timed interleaved; plus data and run information."""
    for r in recipes:
        if r not in RECIPES:
            raise UserError(f"unknown pipeline {r!r}; choose lut and/or mae")
    for c in configurations:
        if c not in CONFIGURATIONS:
            raise UserError(f"unknown configuration {c!r}; choose from {', '.join(CONFIGURATIONS)}")
    say = progress or (lambda _msg: None)
    path, described = resolve_data(data)
    threads = max(1, workers)
    window_images = batch_size * window_batches
    run, missing = select_backends(backend)

    # file sets whose decode floor is measured: the image folder, and each backend's converted data
    file_sets: dict[str, list[bytes]] = {"images": [Path(f).read_bytes() for f in image_files(path, floor_files)]}
    floor_of: dict[str, tuple[str, str | None, bool]] = {}  # backend -> (its floor set, its source set, assumed)
    stored: dict[str, dict | None] = {}
    source_sets: dict[str, str] = {}  # a source folder -> the file set holding its floor (measured once)
    no_jpegs: set[str] = set()  # backends whose converted data holds no JPEGs (raw pixels): no resize bound
    for b in run:
        src = (backend_data or {}).get(b) or path
        if src == path:
            # --data itself may be converted storage (a folder written by `convert folder`): its files are the
            # floor, and the folder it was made from is the source floor.
            meta = stored_info(src) if Path(src).is_dir() else None
            if not (meta or {}).get("source"):
                floor_of[b] = ("images", None, False)
                continue
            stored[b], own = meta, "images"
        else:
            try:
                blobs = stored_jpegs(b, src, floor_files)
            except Exception as e:  # noqa: BLE001 - the floor of stored files is extra information
                blobs = None
                say(f"could not read the JPEGs stored in {src}: {type(e).__name__}: {e}")
            meta = stored[b] = stored_info(src)
            own = f"{b}-stored" if blobs else "images"
            if blobs:
                file_sets[own] = blobs
            else:
                no_jpegs.add(b)
        source = (meta or {}).get("source")
        if source and Path(source).is_dir() and _split_root(source) != _split_root(path):
            key = _split_root(source)
            try:
                if key not in source_sets:
                    file_sets[f"{b}-source"] = [Path(f).read_bytes() for f in image_files(source, floor_files)]
                    source_sets[key] = f"{b}-source"
                floor_of[b] = (own, source_sets[key], False)
            except UserError:
                floor_of[b] = (own, None, False) if src == path else (own, "images", True)
        elif src == path:
            floor_of[b] = (own, None, False)  # the recorded source is gone (or is --data): no second floor
        else:
            floor_of[b] = (own, "images", not source)

    subjects: list = []
    fields: dict[str, dict] = {}
    kinds: list[str] = []
    for name, blobs in file_sets.items():
        for subj, f in floor_subjects(name, blobs, threads, window_images):
            subjects.append(subj)
            fields[subj.key] = f
            kinds.append("floor")
    if "lut" in recipes:  # the bound each LUT pipeline's resize sets, on the files it reads
        from lut_fast.pipelines.spec import AugSpec

        spec = AugSpec(recipe="lut", img_size=img_size)
        pairs = sorted({(floor_of[b][0], RESIZE_OF[b]) for b in run if b in RESIZE_OF and b not in no_jpegs})
        for name in dict.fromkeys(n for n, _ in pairs):
            filters = [f for n, f in pairs if n == name]
            for subj, f in resize_bound_subjects(name, file_sets[name], filters, threads, window_images, spec):
                subjects.append(subj)
                fields[subj.key] = f
                kinds.append("bound")
    if official and "lut" in recipes:
        subj = official_subject(path, img_size, batch_size, workers)
        subjects.append(subj)
        fields[subj.key] = dict(label="official LUT recipe (torchvision/PIL, per-view resize)", backend="official",
                                recipe="lut", configuration="cpu-only", pipeline=RECIPES["lut"], workers=workers,
                                threads=threads, batch_size=batch_size, file_set="images")
        kinds.append("official")
    for b in run:
        src = (backend_data or {}).get(b) or path
        for recipe in recipes:
            for conf in configurations:
                subj = pipeline_subject(b, src, recipe, conf, img_size, batch_size, workers, device)
                subjects.append(subj)
                fields[subj.key] = dict(label=f"{b} {RECIPES[recipe]}, {conf}", backend=b, recipe=recipe,
                                        configuration=conf, pipeline=RECIPES[recipe], workers=workers, threads=threads,
                                        batch_size=batch_size, data=src, file_set=floor_of[b][0])
                kinds.append("pipeline")

    estimate = estimate_seconds(kinds, warmup_rounds + windows, window_images, threads)
    load_start = load_average()
    say(f"bench data: {len(subjects)} subjects ({kinds.count('floor')} decode floors), {warmup_rounds} warm-up + "
        f"{windows} timed rounds of {window_images} images each, interleaved; expect about "
        f"{max(1, round(estimate / 60))} min (load average now {load_start[0] if load_start else '?'})")
    t0 = time.perf_counter()
    sync = synchronizer(device)
    outcome = run_interleaved(subjects, windows, window_batches, warmup_rounds=warmup_rounds, sync=sync,
                              progress=lambda m: say(f"[{time.perf_counter() - t0:5.0f}s] {m}"))
    elapsed = time.perf_counter() - t0
    load_end = load_average()

    results: list[dict] = []
    floors: dict[str, dict] = {}  # file set -> {"images_per_sec": best, "cpu_ms_per_image": least, "decoder": ...}
    by_key = {s.key: s for s in subjects}
    for s in subjects:
        f = fields[s.key]
        if s.key in outcome.errors:
            status, reason = describe_failure(f["backend"], outcome.errors[s.key])
            results.append(row("data", s.key, status, reason, **f))
            continue
        r = row("data", s.key, **f, **_summary(outcome.samples[s.key]), quiesce_timeouts=outcome.quiesce_timeouts[s.key])
        if isinstance(s, StreamSubject):
            r.update(_batch_fields(s.last_batch), startup_s=round_sig(s.startup_s),
                     epoch_start_s=round_sig(median(s.epoch_start_s)), epochs_started=s.epoch + 1,
                     batches_per_epoch=s.batches_per_epoch, paused_between_windows=s.pausable,
                     drained_batches=0 if s.pausable else s.ready_depth,
                     cpu_clock="idle to idle" if s.works_ahead else "window")  # interleave's module doc
        elif f["backend"] == "floor":
            fl = floors.setdefault(f["file_set"], {"images_per_sec": 0.0, "cpu_ms_per_image": float("inf")})
            if r["images_per_sec"] > fl["images_per_sec"]:
                fl.update(images_per_sec=r["images_per_sec"], decoder=f["decoder"])
            fl["cpu_ms_per_image"] = min(fl["cpu_ms_per_image"], r["cpu_ms_per_image"])
        results.append(r)
    del by_key

    off = next((r for r in results if r["key"] == "data/official/lut/cpu-only" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] != "ok" or r.get("backend") == "floor":
            continue
        own = floors.get(r.get("file_set", "images"))
        if own:
            r["frac_of_decode_floor"] = round_sig(r["images_per_sec"] / own["images_per_sec"])
            r["frac_of_decode_floor_cpu"] = round_sig(own["cpu_ms_per_image"] / r["cpu_ms_per_image"]) if r["cpu_ms_per_image"] else None
        _, source_set, assumed = floor_of.get(r.get("backend"), (None, None, False))
        src = floors.get(source_set) if source_set else None
        if src:
            r["frac_of_source_floor"] = round_sig(r["images_per_sec"] / src["images_per_sec"])
            r["frac_of_source_floor_cpu"] = round_sig(src["cpu_ms_per_image"] / r["cpu_ms_per_image"]) if r["cpu_ms_per_image"] else None
            r["source_file_set"] = source_set
            r["source_floor_assumed"] = assumed
        if off is not None and r.get("recipe") == "lut":
            r["vs_official"] = round_sig(r["images_per_sec"] / off["images_per_sec"])
            r["vs_official_cpu"] = round_sig(off["cpu_ms_per_image"] / r["cpu_ms_per_image"]) if r["cpu_ms_per_image"] else None
        r["load_avg_start"], r["load_avg_end"] = (load_start or [None])[0], (load_end or [None])[0]
        add_goal(r)
    bounds = {(r["file_set"], r["filter"]): r for r in results if r.get("backend") == "resize-bound" and r["status"] == "ok"}
    for r in results:  # LUT rows: the most their resize allows, and what their loader adds to it
        bound = bounds.get((r.get("file_set"), RESIZE_OF.get(r.get("backend", ""))))
        if bound and r["status"] == "ok" and r.get("recipe") == "lut" and r.get("configuration") == "gpu-training":
            r["resize_bound_frac_of_floor_cpu"] = bound.get("frac_of_decode_floor_cpu")
            r["loader_cpu_ms_per_image"] = round_sig(r["cpu_ms_per_image"] - bound["cpu_ms_per_image"])
    for r in missing:
        results.append(r)

    if device.type == "cuda":
        for recipe in recipes:
            results.append(bench_device_stage(recipe, img_size, batch_size, device, 2, windows, window_batches))
    if device_decode is None:
        device_decode = device.type == "cuda"
    if device_decode:
        files = image_files(path, floor_files)
        results.append(bench_device_decode(files, None, img_size, batch_size, device, 2, windows, window_batches))
        for recipe in recipes:
            results.append(bench_device_decode(files, recipe, img_size, batch_size, device, 2, windows, window_batches))

    info = {"data": described, "data_path": path, "floor_files": {k: len(v) for k, v in file_sets.items()},
            "decode_floors": {k: {kk: (round_sig(vv) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                              for k, v in floors.items()},
            "decode_floor_images_per_sec": floors.get("images", {}).get("images_per_sec"),
            "floor_threads": threads, "configurations": list(configurations), "warmup_rounds": warmup_rounds,
            "window_images": window_images, "load_avg_start": load_start, "load_avg_end": load_end,
            "elapsed_s": round(elapsed, 1), "estimated_s": round(estimate), "stored_metadata": stored,
            "window_order": outcome.order[: len(subjects)]}
    return results, info
