"""The torch backend: decoding, geometry, per-sample randomness, workers, errors (photometric ops: test_photometric.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lut_fast.datasets.builtin import builtin_path
from lut_fast.datasets.imagefolder import scan_image_folder
from lut_fast.pipelines import build_loader
from lut_fast.errors import UserError
from lut_fast.pipelines import torch_backend as tb
from lut_fast.pipelines.spec import AugSpec
from lut_fast.pipelines.torch_backend import DualViewDataset, EpochSampler

SPEC = AugSpec(img_size=32)


def test_sampler_shards_are_disjoint_cover_and_resume():
    n, bs, world = 103, 5, 3
    shards = [EpochSampler(n, bs, seed=1, rank=r, world_size=world) for r in range(world)]
    for s in shards:
        s.set_epoch(2)
    seen = [[i for _, i in s] for s in shards]
    flat = [i for part in seen for i in part]
    assert len(flat) == len(set(flat)) == world * (n // world // bs) * bs
    s = shards[0]
    s.set_epoch(2, start_batch=3)
    assert [i for _, i in s] == seen[0][3 * bs :]
    s.set_epoch(3)
    assert [i for _, i in s] != seen[0]  # a new order each epoch


def test_uniforms_are_a_function_of_seed_epoch_index_only():
    u = tb.sample_uniforms(3, [1, 1, 2], [5, 9, 5], 6)
    assert u.shape == (3, 6) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(u[1], tb.sample_uniforms(3, [1], [9], 6)[0])  # batch-mates change nothing
    assert np.array_equal(u[:, :4], tb.sample_uniforms(3, [1, 1, 2], [5, 9, 5], 4))  # a prefix of the stream
    assert not np.array_equal(u[0], u[2]) and not np.array_equal(u[0], tb.sample_uniforms(4, [1], [5], 6)[0])
    many = tb.sample_uniforms(0, np.zeros(20000, dtype=np.int64), np.arange(20000), 2)
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03


@pytest.mark.parametrize("recipe", ["lut", "mae"])
def test_augmentations_depend_only_on_seed_epoch_index(recipe):
    spec = AugSpec(recipe=recipe, img_size=32)
    samples = scan_image_folder(builtin_path()).samples[:12]
    ds = DualViewDataset(samples, spec, seed=3)
    batch = tb.unpack_batch(ds.__getitems__([(1, 2), (1, 7), (0, 2)]))
    alone = ds[(1, 7)]
    assert torch.equal(batch.view1[1], alone.view1[0])
    if recipe == "lut":
        assert torch.equal(batch.view2[1], alone.view2[0]) and torch.equal(batch.strong_params[1], alone.strong_params[0])
    assert not torch.equal(batch.view1[0], batch.view1[2])  # another epoch, other views


def test_views_are_windows_of_the_resized_image():
    """SRC by hand: resize the shorter side to S (PIL's bicubic), reflect-pad, crop S x S, maybe mirror."""
    spec = AugSpec(img_size=32)
    path, _ = scan_image_folder(builtin_path()).samples[0]
    ds = DualViewDataset([(path, 0)], spec, seed=5)
    out = ds[(0, 0)]
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = 32 / min(w, h)
    ref = np.asarray(img.resize((max(32, round(w * scale)), max(32, round(h * scale))), Image.BICUBIC))
    padded = np.pad(ref, ((4, 4), (4, 4), (0, 0)), mode="reflect").astype(int)
    u = tb.sample_uniforms(5, [0], [0], tb.LUT_NUM_DRAWS)[0]
    d = tb.LUT_DRAWS
    for view, (top, left, flip) in ((out.view1[0], ("top1", "left1", "flip1")), (out.view2[0], ("top2", "left2", "flip2"))):
        y = int(u[d[top]] * (padded.shape[0] - 32 + 1))
        x = int(u[d[left]] * (padded.shape[1] - 32 + 1))
        want = padded[y : y + 32, x : x + 32]
        if u[d[flip]] < spec.flip_p:
            want = want[:, ::-1]
        got = view.permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - want).max() <= 2 and (got != want).mean() < 0.05  # torch's vs PIL's rounding


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_hwc_padding_equals_torch_padding(mode):
    for h, w, pad in ((7, 9, 4), (5, 5, 1), (12, 6, 3)):
        x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        want = torch.nn.functional.pad(x[None], (pad,) * 4, mode=tb._PAD_MODES[mode])[0]
        assert torch.equal(tb.pad_hwc(x.permute(1, 2, 0), pad, mode).permute(2, 0, 1), want)


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_windows_cut_from_the_unpadded_image_equal_pad_then_slice(mode):
    """window_into (no padded copy) gives exactly the window of the padded image at every position, for
    images wider, taller and as small as the window, paddings up to just below the window size."""
    rng = np.random.default_rng(0)
    for h, w, size, pad in ((8, 11, 8, 4), (9, 8, 8, 3), (8, 8, 8, 1), (12, 30, 10, 4), (5, 5, 5, 4), (6, 7, 5, 2)):
        img = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        padded = tb.pad_hwc(img, pad, mode)
        for top in range(h + 2 * pad - size + 1):
            for left in range(w + 2 * pad - size + 1):
                out = np.full((size, size, 3), 77, np.uint8)
                tb.window_into(img.numpy(), top, left, size, pad, mode, out)
                want = padded[top : top + size, left : left + size].numpy()
                assert np.array_equal(out, want), (h, w, size, pad, top, left)
    planar = torch.empty((3, 8, 8), dtype=torch.uint8)  # a strided destination (HWC view of planar memory)
    img = torch.from_numpy(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    tb.window_into(img.numpy(), 1, 6, 8, 4, mode, planar.permute(1, 2, 0).numpy())
    assert torch.equal(planar.permute(1, 2, 0), tb.pad_hwc(img, 4, mode)[1:9, 6:14])


def test_compiled_windows_equal_window_into_then_a_mirror():
    """src_windows (numba; what every CPU backend cuts SRC views with) against the numpy reference, at every
    window position of images wider, taller and as small as the window, mirrored and not."""
    pytest.importorskip("numba")
    from lut_fast.pipelines import src_windows

    rng = np.random.default_rng(1)
    for h, w, size, pad in ((8, 11, 8, 4), (9, 8, 8, 3), (8, 8, 8, 1), (12, 30, 10, 4), (5, 5, 5, 4), (6, 7, 5, 2), (7, 9, 6, 0)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for top in range(h + 2 * pad - size + 1):
            for left in range(w + 2 * pad - size + 1):
                want = np.empty((size, size, 3), np.uint8)
                tb.window_into(img, top, left, size, pad, "reflect", want)
                v1, v2 = np.full_like(want, 77), np.full_like(want, 77)
                src_windows.src_views_hwc(v1, v2, img, pad, top, left, False, top, left, True)
                assert np.array_equal(v1, want) and np.array_equal(v2, want[:, ::-1]), (h, w, size, pad, top, left)


def test_shared_in_place_mirror_reverses_every_row():
    """MAE's flip in FFCV's and DALI's compiled code: odd and even widths, one-pixel rows."""
    pytest.importorskip("numba")
    import numba

    from lut_fast.pipelines.src_windows import mirror_rows

    mirror = numba.njit(lambda img: mirror_rows(img))  # inline-only: called from compiled code, as its users do
    rng = np.random.default_rng(2)
    for h, w in ((5, 7), (4, 8), (3, 1)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = img[:, ::-1].copy()
        mirror(img)
        assert np.array_equal(img, want), (h, w)


@pytest.mark.parametrize("stored", ["original", "at the view size"])
def test_batches_cut_by_the_compiled_windows_equal_the_numpy_ones(monkeypatch, tmp_path, stored):
    pytest.importorskip("numba")
    spec = AugSpec(img_size=32)
    samples = scan_image_folder(builtin_path()).samples[:8]
    if stored != "original":  # shorter side already 32: the decoded image itself is cut
        for i, (path, label) in enumerate(samples):
            img = Image.open(path).convert("RGB")
            img.resize((32, round(32 * img.height / img.width)) if img.width < img.height else (round(32 * img.width / img.height), 32),
                       Image.BICUBIC).save(tmp_path / f"{i}.jpg", quality=90)
            samples[i] = (str(tmp_path / f"{i}.jpg"), label)
    ds = DualViewDataset(samples, spec, seed=4)
    keys = [(3, i) for i in range(8)]
    assert ds._compiled_windows(ds.new_views(8))
    compiled = ds.__getitems__(keys)["views"]
    monkeypatch.setattr(tb, "_src_windows", False)  # as without numba
    assert not ds._compiled_windows(ds.new_views(8))
    assert torch.equal(compiled, ds.__getitems__(keys)["views"])


@pytest.mark.parametrize("opencv", [True, False])
def test_mirror_in_place_with_and_without_opencv(monkeypatch, opencv):
    if opencv and not tb._load_cv2():
        pytest.skip("OpenCV is not installed")
    if not opencv:
        monkeypatch.setattr(tb, "_cv2", False)
    buf = torch.randint(0, 256, (2, 9, 7, 3), dtype=torch.uint8)  # NHWC memory, as the views handed over
    for i in range(2):
        view = buf[i].permute(2, 0, 1)
        want = view.flip(-1).clone()
        tb.mirror_in_place(view, view.permute(1, 2, 0).numpy())
        assert torch.equal(view, want)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("size", [24, 96])  # shrinks the crop / enlarges it
def test_resize_into_a_batch_view_equals_interpolate(interpolation, size):
    """MAE's crops are resized straight into the batch (aten's out= form): the pixels of ``F.interpolate``,
    into channels-last views and planar ones, from a crop of HWC decoder memory."""
    hwc = torch.randint(0, 256, (70, 90, 3), dtype=torch.uint8)
    crop = hwc.permute(2, 0, 1)[:, 5:65, 7:80]  # (3, 60, 73), channels-last strides, not contiguous
    want = tb._resize(crop, size, size, interpolation, channels_last=True)[0]
    nhwc = torch.zeros(2, size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    planar = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    for views in (nhwc, planar):
        tb.resize_into(crop, views[1], interpolation, channels_last=True)
        assert torch.equal(views[1], want)
        assert not views[0].any()  # nothing written outside the view


@pytest.mark.parametrize("recipe", ["lut", "mae"])
def test_channels_last_and_planar_views_are_the_same_pixels(recipe):
    """Views handed over for the device stage are NHWC, those the loader works on NCHW: same pixels either way."""
    spec = AugSpec(recipe=recipe, img_size=32)
    samples = scan_image_folder(builtin_path()).samples[:6]
    nhwc = DualViewDataset(samples, spec, seed=2, photometric_in_loader=False)
    planar = DualViewDataset(samples, spec, seed=2, photometric_in_loader=True)
    assert nhwc.channels_last_views and not planar.channels_last_views
    if recipe == "mae":
        keys = [(1, i) for i in range(6)]
        a, b = nhwc.__getitems__(keys)["views"], planar.__getitems__(keys)["views"]
        assert a[0].is_contiguous(memory_format=torch.channels_last) and b[0].is_contiguous()
        assert torch.equal(a[0], b[0])
        return
    u = tb.sample_uniforms(2, [1] * 6, list(range(6)), tb.LUT_NUM_DRAWS)
    a, b = nhwc.new_views(6), planar.new_views(6)
    for i in range(6):  # the windows alone (the planar loader applies view 2's ops afterwards)
        img = tb.load_rgb(samples[i][0])
        nhwc._src_views(img, u[i].tolist(), a[0][i], a[1][i])
        planar._src_views(img, u[i].tolist(), b[0][i], b[1][i])
    assert a[0].is_contiguous(memory_format=torch.channels_last) and b[0].is_contiguous()
    assert torch.equal(a, b)


def test_stored_at_the_training_size_skips_the_resize(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (32, 45, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = tb.load_rgb(str(tmp_path / "a.png"))
    assert torch.equal(tb.resize_shorter(img, 32, "bicubic")[0], torch.from_numpy(arr).permute(2, 0, 1))


@pytest.mark.parametrize("fast", ["simplejpeg", "torchvision"])
def test_decoders_agree(tmp_path, monkeypatch, fast):
    """The fast JPEG paths (simplejpeg, else torchvision) and Pillow give the same pixels."""
    if fast == "simplejpeg":
        pytest.importorskip("simplejpeg")  # the `jpeg` extra, installed by `make test`
    else:
        monkeypatch.setattr(tb, "simplejpeg", None)
    arr = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(arr).convert("L").save(tmp_path / "g.jpg", quality=90)
    for name in ("a.jpg", "g.jpg"):
        fast = tb.load_rgb(str(tmp_path / name))
        pil = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert fast.shape == (3, 40, 56) and np.array_equal(fast.permute(1, 2, 0).numpy(), pil)


def test_unreadable_files_are_replaced_and_counted(tmp_path):
    good = np.zeros((40, 40, 3), np.uint8)
    Image.fromarray(good).save(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:100])  # truncated
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    ds = DualViewDataset([(str(tmp_path / n), i) for i, n in enumerate(("bad.jpg", "text.jpg", "good.jpg"))],
                         AugSpec(img_size=32))
    batch = ds.__getitems__([(0, 0), (0, 2)])
    assert [Path(p).name for p in batch["bad"]] == ["bad.jpg", "text.jpg"] and batch["labels"].tolist() == [2, 2]


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_no_readable_image_is_one_line_from_the_workers(tmp_path, workers):
    (tmp_path / "c" ).mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.jpg").write_bytes(b"not an image")
    loader = build_loader("torch", str(tmp_path), AugSpec(img_size=32), batch_size=2, num_workers=2, workers=workers)
    loader.set_epoch(0)
    with pytest.raises(UserError) as err:
        next(iter(loader))
    assert str(err.value) == "no readable image in the dataset"


def test_converted_formats_name_the_backend_that_reads_them(tmp_path):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    with pytest.raises(UserError, match="--backend ffcv"):
        build_loader("torch", str(beton), AugSpec(img_size=32), batch_size=2)
    from lut_fast.datasets.dali_writer import MANIFEST

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / MANIFEST).write_text("{}")
    with pytest.raises(UserError, match="--backend dali"):
        build_loader("torch", str(shards), AugSpec(img_size=32), batch_size=2)


@pytest.mark.parametrize("recipe", ["lut", "mae"])
def test_views_do_not_depend_on_workers_or_batch_size(recipe):
    spec = AugSpec(recipe=recipe, img_size=32)
    one = build_loader("torch", None, spec, batch_size=8, num_workers=0, seed=4)
    two = build_loader("torch", None, spec, batch_size=4, num_workers=2, seed=4)
    for loader in (one, two):
        loader.set_epoch(1)
    a = next(iter(one))
    it = iter(two)
    b1, b2 = next(it), next(it)
    assert torch.equal(a.view1, torch.cat([b1.view1, b2.view1])) and torch.equal(a.labels, torch.cat([b1.labels, b2.labels]))
    if recipe == "lut":
        assert torch.equal(a.view2, torch.cat([b1.view2, b2.view2]))


@pytest.mark.parametrize("recipe", ["lut", "mae"])
def test_loader_yields_normalised_batches(recipe):
    spec = AugSpec(recipe=recipe, img_size=32)
    loader = build_loader("torch", None, spec, batch_size=8, num_workers=0, seed=0)
    assert len(loader) == 480 // 8
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert batch.view1.shape == (8, 3, 32, 32) and batch.view1.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and batch.labels.shape == (8,)
    assert (batch.view2 is None) == (recipe == "mae")
    lo = (0 - max(spec.mean)) / min(spec.std)
    hi = (1 - min(spec.mean)) / min(spec.std)
    assert batch.view1.min() >= lo - 1e-4 and batch.view1.max() <= hi + 1e-4
    if recipe == "lut":
        assert batch.view2.shape == batch.view1.shape


def test_photometric_on_device_equals_in_worker():
    spec = AugSpec(img_size=32)
    worker = build_loader("torch", None, spec, batch_size=16, num_workers=0, photometric_on="worker")
    device = build_loader("torch", None, spec, batch_size=16, num_workers=0, photometric_on="device")
    plain = build_loader("torch", None, AugSpec(img_size=32, jitter_p=0.0, strong_ops=("solarize",)), batch_size=16,
                         num_workers=0, photometric_on="device")
    raw = next(iter(device.raw_batches()))
    assert raw.strong_params is not None and raw.view2.dtype == torch.uint8
    a, b = next(iter(worker)), next(iter(device))
    assert torch.equal(a.view1, b.view1)
    # the worker path rounds to uint8 once, at the end; the device path stays float
    assert (a.view2 - b.view2).abs().max().item() < 0.5 / 255 / min(spec.std) + 1e-4
    # ... and the ops did something (the same crops without them differ from view 2)
    assert (next(iter(plain)).view2 - b.view2).abs().max().item() > 0.1


def test_resume_mid_epoch_gives_the_same_batches():
    spec = AugSpec(img_size=32)
    loader = build_loader("torch", None, spec, batch_size=8, num_workers=2, seed=2, photometric_on="loader")
    loader.set_epoch(3)
    it = iter(loader)
    full = [next(it) for _ in range(4)]
    loader.set_epoch(3, start_batch=2)
    it = iter(loader)
    resumed = [next(it) for _ in range(2)]
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2) and torch.equal(a.labels, b.labels)


def _raw(loader, count):
    it = loader.raw_batches()
    out = []
    for _ in range(count):
        raw = next(it)
        out.append((raw.view1.clone(), None if raw.view2 is None else raw.view2.clone(), raw.labels.clone(),
                    raw.strong_params))
    it.close()
    return out


@pytest.mark.parametrize("recipe,photometric_on", [("lut", "device"), ("lut", "loader"), ("mae", "device")])
def test_thread_and_process_workers_make_the_same_batches(recipe, photometric_on):
    spec = AugSpec(recipe=recipe, img_size=32)
    made = {}
    for workers, num in (("threads", 2), ("processes", 2), ("threads", 0)):
        loader = build_loader("torch", None, spec, batch_size=8, num_workers=num, seed=5,
                              photometric_on=photometric_on, workers=workers)
        assert loader.workers == ("main" if num == 0 else workers)
        loader.set_epoch(2, start_batch=1)
        made[workers, num] = _raw(loader, 3)
    ref = made["threads", 0]
    for key, got in made.items():
        for a, b in zip(ref, got):
            for x, y in zip(a, b):
                assert (x is None and y is None) or torch.equal(x, y), key


def test_thread_workers_never_overwrite_a_batch_the_consumer_may_still_hold():
    """Reused buffers: a raw batch stays intact while the consumer takes the next one, across epochs."""
    loader = build_loader("torch", None, AugSpec(img_size=32), batch_size=4, num_workers=2, seed=1,
                          photometric_on="device", workers="threads")
    ring = loader.threaded.depth
    held = []
    for epoch in range(2):
        loader.set_epoch(epoch, start_batch=len(loader) - ring)  # short epochs: the ring wraps at the boundary
        for raw in loader.raw_batches():
            held.append((raw, raw.view1.clone(), raw.view2.clone()))
            if len(held) >= 2:  # the previous batch, while this one is out
                prev, v1, v2 = held[-2]
                assert torch.equal(prev.view1, v1) and torch.equal(prev.view2, v2)
    buffers = {raw.view1.untyped_storage().data_ptr() for raw, _, _ in held}
    assert len(buffers) == ring  # the ring is reused, not reallocated


@pytest.mark.parametrize("recipe,channels_last", [("lut", False), ("lut", True), ("mae", False)])
def test_cpu_only_threads_normalise_as_the_device_stage_does(recipe, channels_last):
    """CPU-only training: the loader threads hand over normalised float32 views equal to finish_batch's."""
    spec = AugSpec(recipe=recipe, img_size=32)
    got = {}
    for workers, num in (("threads", 2), ("threads", 0)):
        loader = build_loader("torch", None, spec, batch_size=8, num_workers=num, seed=5, photometric_on="loader",
                              workers=workers, channels_last=channels_last)
        loader.set_epoch(1)
        it = iter(loader)
        got[num] = [next(it) for _ in range(3)]
        it.close()
    assert got[2][0].view1.dtype == torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for a, b in zip(got[0], got[2]):  # num_workers=0: uint8 views normalised by finish_batch in the consumer
        assert b.view1.is_contiguous(memory_format=fmt)
        assert torch.equal(a.view1, b.view1) and torch.equal(a.labels, b.labels)
        assert (a.view2 is None and b.view2 is None) or torch.equal(a.view2, b.view2)


def test_normalised_batches_the_consumer_keeps_are_never_overwritten():
    """The float ring reuses a buffer only once nothing refers to it; kept batches get their own memory."""
    loader = build_loader("torch", None, AugSpec(img_size=32), batch_size=4, num_workers=2, seed=1,
                          photometric_on="loader", workers="threads")
    ring = loader.threaded.depth
    loader.set_epoch(0)
    kept = [(b, b.view1.clone(), b.view2.clone()) for b in loader]  # every batch held to the end
    assert len(kept) > ring
    for b, v1, v2 in kept:
        assert torch.equal(b.view1, v1) and torch.equal(b.view2, v2)
    assert len({b.view1.untyped_storage().data_ptr() for b, _, _ in kept}) == len(kept)
    del kept, b
    loader.set_epoch(1)
    seen = set()
    for b in loader:  # dropped as soon as the next one comes: the ring's buffers are reused
        seen.add(b.view1.untyped_storage().data_ptr())
    assert len(seen) <= ring


def test_leaving_mid_epoch_stops_the_threads_writing():
    """A consumer that stops early (stop signal, break) leaves no job behind to write into the next epoch's batches."""
    loader = build_loader("torch", None, AugSpec(img_size=32), batch_size=4, num_workers=2, seed=3,
                          photometric_on="device", workers="threads")
    loader.set_epoch(0)
    it = loader.raw_batches()
    next(it)
    it.close()  # the generator waits for the jobs already running
    loader.set_epoch(0, start_batch=1)
    again = _raw(loader, 2)
    loader.set_epoch(0)
    fresh = _raw(loader, 3)[1:]
    for a, b in zip(again, fresh):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    threads = loader.threaded.pool._threads
    assert all(t.daemon for t in threads)  # never hold up the interpreter's exit
    loader.close()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_the_next_epoch_is_under_way_before_this_one_ends(workers):
    """The key stream runs on across epoch boundaries (no epoch starts with one worker building a whole batch
    alone), yet every epoch is the one asked for: continued, repeated or started anew."""
    spec = AugSpec(img_size=32)

    def loader_at(epoch, start=0):
        loader = build_loader("torch", None, spec, batch_size=4, num_workers=2, seed=4, photometric_on="device",
                              workers=workers)
        loader.set_epoch(epoch, start)
        return loader

    loader = loader_at(0)
    first = _raw(loader, len(loader))
    stream = loader._stream
    if workers == "threads":  # the next epoch's first batches were queued while this one ended
        assert loader.threaded.made > len(loader)
    loader.set_epoch(1)
    second = _raw(loader, len(loader))
    assert loader._stream is stream  # the same stream went on into epoch 1
    loader.set_epoch(1)  # epoch 1 once more: a new stream, the same batches
    again = _raw(loader, 2)
    for got, want in ((first, _raw(loader_at(0), len(first))), (second, _raw(loader_at(1), len(second))),
                      (again, second[:2])):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert not torch.equal(first[0][0], second[0][0])
    loader.close()


@pytest.mark.parametrize("workers,num", [("processes", 2), ("threads", 0)])
def test_loading_leaves_the_global_rng_alone(workers, num):
    """The trainer's own randomness (mixup, erasing) must not depend on when the loader starts a key stream."""
    loader = build_loader("torch", None, AugSpec(img_size=32), batch_size=4, num_workers=num, seed=2,
                          photometric_on="device", workers=workers)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for epoch, start in ((0, 0), (0, 1), (3, 0)):  # two new streams and a repeated position
        loader.set_epoch(epoch, start)
        _raw(loader, 2)
    assert torch.equal(torch.get_rng_state(), before)
    loader.close()


def test_worker_kind_is_checked():
    with pytest.raises(UserError, match="torch_workers must be one of"):
        build_loader("torch", None, AugSpec(img_size=32), batch_size=4, num_workers=2, workers="fibres")
    assert tb.resolve_worker_kind("auto", 2) == "threads"
    assert tb.resolve_worker_kind("auto", tb.AUTO_THREADS_MAX + 1) == "processes"


def test_exit_with_thread_workers_busy_is_clean():
    """The interpreter leaves while the threads are mid-batch (a run stopped mid-epoch): exit 0, nothing on stderr."""
    import subprocess
    import sys

    script = (
        "from lut_fast.pipelines import build_loader\n"
        "from lut_fast.pipelines.spec import AugSpec\n"
        "loader = build_loader('torch', None, AugSpec(img_size=64), 16, num_workers=2, photometric_on='loader',"
        " workers='threads')\n"
        "loader.set_epoch(0)\n"
        "it = iter(loader)\n"
        "next(it)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]


def test_loader_threads_leave_the_trainers_torch_threads_alone():
    import threading

    before = torch.get_num_threads()
    loader = build_loader("torch", None, AugSpec(img_size=32), batch_size=4, num_workers=2, workers="threads")
    loader.set_epoch(0)
    next(iter(loader.raw_batches()))
    seen = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    assert torch.get_num_threads() == before and seen == [before]  # this thread and threads started later
    assert loader.threaded.pool.submit(torch.get_num_threads).result() == 1  # the loader's own: one each
    loader.close()


def test_malloc_tuning_respects_the_users_choice(monkeypatch):
    """Freed memory kept for reuse (glibc): not with LUT_FAST_MALLOC_TUNING=0 or the user's own malloc settings."""
    import platform

    from lut_fast.pipelines import malloc

    monkeypatch.setenv(malloc.OPT_OUT, "0")
    assert malloc._apply() is False
    monkeypatch.delenv(malloc.OPT_OUT)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert malloc._apply() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    for name in malloc.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert malloc._apply() is expected
