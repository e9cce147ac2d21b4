"""Parity of the torch, DALI and FFCV pipelines on one small probe dataset (all on CPU).

The backends draw different random numbers, so pixels cannot be compared;
what can be compared is measured from the outputs alone, the same way for
every backend (no backend reports its own decisions):

* ``a_flat``: images of one flat, saturated color c. Any crop or flip of a
  flat image is c, so view 1 must be c everywhere (no photometric change),
  and view 2 tells which strong op ran (grayscale: R = G = B; solarize: all
  channels <= 127; otherwise blur, the identity on a flat image) and whether
  jitter ran (view 2 differs from what the op alone makes of c).
* ``b_ramp``: gray ramps, dark left to bright right, in several aspect
  ratios: the sign of the horizontal gradient of view 1 is the flip, its
  mean brightness the horizontal crop position, and view 1 must stay gray.
* two classes of the built-in dataset: per-channel mean and std of each view,
  compared with the torch reference (averaged over four seeded torch runs).

Tolerances, stated once below: rates within 0.12 (about four binomial
standard errors at these sample sizes); per-channel statistics of the
normalised views within 0.05 (mean, view 1: about 3 gray levels), 0.20
(mean, view 2: its random jitter makes one run's mean spread by about 0.05
per channel, up to 0.1 from run to run; hence a reference averaged over
seeds: against one seed's, unseeded FFCV missed 0.20 once in seven runs)
and 0.10 (std: OpenCV's area resize in FFCV smooths a little more than
bicubic); ramp brightness (crop position) within 0.03 of torch. The same
tolerances hold for views made from storage pre-resized to the view size
(``*-stored-at-S``: the resize done by the converter, once) and for views
whose photometric ops run in ``finish_batch`` (``*-device``).
Torch and DALI are seeded and deterministic; FFCV's augmentations are not.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lut_fast.datasets.builtin import builtin_path
from lut_fast.errors import UserError
from lut_fast.pipelines import build_loader
from lut_fast.pipelines.spec import AugSpec

# numba's finaliser in FFCV raises a harmless KeyError under pytest (docs/BACKENDS.md, FFCV "Known quirks").
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

S, BATCH, EPOCHS = 32, 16, 4
RATE_TOL = 0.12  # |measured rate - expected| (flip 0.5, each strong op 1/3, jitter 0.8)
PIXEL_TOL = 6.0  # 0..255: JPEG storage and resize of a flat image
MEAN_TOL = {"v1": 0.05, "v2": 0.20}  # per-channel mean of normalised views vs torch
STD_TOL = 0.10  # per-channel std of normalised views vs torch
RAMP_TOL = 0.03  # mean / std of view-1 brightness on ramps (0..1) vs torch: where crops land
N_FLAT, N_RAMP = 64, 64
REFERENCE_SEEDS = (0, 1, 2, 3)  # torch runs whose channel statistics are the reference

FLAT = [(230, 40, 40), (40, 220, 60), (60, 90, 235), (235, 200, 30), (30, 210, 220), (220, 50, 210),
        (250, 140, 20), (140, 40, 240), (20, 240, 140), (240, 120, 160), (120, 230, 40), (200, 100, 250)]
SIZES = [(64, 48), (48, 64), (96, 48), (48, 48), (80, 60), (60, 90)]  # (width, height)
BUILTIN_CLASSES = ("checker", "stripes")
CLASSES = ("a_flat", "b_ramp") + BUILTIN_CLASSES


def _luma(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def write_probe(root: Path) -> Path:
    """N_FLAT flat, N_RAMP ramp, 2 x 48 built-in images: ImageFolder at ``root/train``."""
    train = root / "train"
    for cls in CLASSES:
        (train / cls).mkdir(parents=True)
    for i in range(N_FLAT):
        w, h = SIZES[i % len(SIZES)]
        Image.new("RGB", (w, h), FLAT[i % len(FLAT)]).save(train / "a_flat" / f"{i:03d}.jpg", quality=100)
    for i in range(N_RAMP):
        w, h = SIZES[i % len(SIZES)]
        row = np.linspace(30, 225, w).round().astype(np.uint8)
        ramp = np.repeat(np.tile(row, (h, 1))[..., None], 3, axis=2)
        Image.fromarray(ramp).save(train / "b_ramp" / f"{i:03d}.jpg", quality=100)
    for cls in BUILTIN_CLASSES:
        for src in sorted((builtin_path() / "train" / cls).glob("*.jpg")):
            shutil.copy(src, train / cls / src.name)
    return root


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, Path]:
    from lut_fast.datasets.dali_writer import write_shards
    from lut_fast.datasets.ffcv_writer import write_beton
    from lut_fast.datasets.folder_writer import write_folder

    root = write_probe(tmp_path_factory.mktemp("probe"))
    return {
        "folder": root,
        "shards": write_shards(root, root / "shards", workers=2, shard_size=64).output,
        "beton": write_beton(root, root / "probe.beton", workers=2, jpeg_quality=95).output,
        # Stored with the shorter side at the view size (convert --shorter-side S): the loaders skip the resize.
        "shards_at_s": write_shards(root, root / "shards_s", workers=2, shard_size=64, shorter_side=S).output,
        "beton_at_s": write_beton(root, root / "probe_s.beton", workers=2, jpeg_quality=95, shorter_side=S).output,
        "folder_at_s": write_folder(root, root / "folder_s", S, workers=2, jpeg_quality=95).output,
    }


@dataclass
class Views:
    """EPOCHS epochs of one loader, un-normalised to 0..255 (float64, NCHW)."""

    v1: np.ndarray
    v2: np.ndarray | None
    labels: np.ndarray
    batches: int
    channels_last_ok: bool

    def of(self, cls: str) -> np.ndarray:
        return self.labels == CLASSES.index(cls)


def _unnormalize(x: torch.Tensor, spec: AugSpec) -> np.ndarray:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    return (x.float() * std + mean).double().numpy()


def collect(backend: str, data: Path, recipe: str, channels_last: bool = False, photometric_on: str = "loader",
            seed: int = 0) -> Views:
    spec = AugSpec(recipe=recipe, img_size=S)
    loader = build_loader(backend, str(data), spec, BATCH, num_workers=2, seed=seed, channels_last=channels_last,
                          photometric_on=photometric_on)
    v1, v2, labels, ok = [], [], [], True
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for b in loader:
            for view in (b.view1, b.view2):
                if view is not None:
                    assert view.dtype == torch.float32 and view.shape == (BATCH, 3, S, S)
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    ok &= view.is_contiguous(memory_format=fmt)
            assert b.labels.dtype == torch.int64 and b.labels.shape == (BATCH,)
            v1.append(_unnormalize(b.view1, spec))
            if b.view2 is not None:
                v2.append(_unnormalize(b.view2, spec))
            labels.append(b.labels.numpy())
    return Views(np.concatenate(v1), np.concatenate(v2) if v2 else None, np.concatenate(labels), len(loader), ok)


# "-device" cases: the loader hands over uint8 views and view 2's parameters, and finish_batch applies
# the photometric ops (here on the CPU: the same code a GPU runs after the copy).
LUT_CASES = {  # name: (backend, data key, channels_last, photometric_on)
    "torch": ("torch", "folder", False, "loader"),
    "dali-folder": ("dali", "folder", True, "loader"),
    "dali-shards": ("dali", "shards", False, "loader"),
    "dali-device": ("dali", "shards", True, "device"),
    "ffcv": ("ffcv", "beton", True, "loader"),
    "ffcv-device": ("ffcv", "beton", False, "device"),
    "dali-stored-at-S": ("dali", "shards_at_s", False, "loader"),
    "ffcv-stored-at-S": ("ffcv", "beton_at_s", True, "device"),
    "torch-stored-at-S": ("torch", "folder_at_s", False, "loader"),
    "torch-stored-at-S-device": ("torch", "folder_at_s", True, "device"),
}
MAE_CASES = {  # name: (backend, data key, photometric_on)
    "torch": ("torch", "folder", "loader"), "dali": ("dali", "shards", "loader"),
    "dali-device": ("dali", "shards", "device"), "ffcv": ("ffcv", "beton", "loader"),
}
_cache: dict[tuple, Views] = {}


def _views(probe, backend: str, key: str, recipe: str, channels_last: bool = False, photometric_on: str = "loader") -> Views:
    k = (backend, key, recipe, channels_last, photometric_on)
    if k not in _cache:
        _cache[k] = collect(backend, probe[key], recipe, channels_last, photometric_on)
    return _cache[k]


@pytest.fixture(scope="module", params=list(LUT_CASES))
def lut(request, probe) -> Views:
    backend, key, channels_last, place = LUT_CASES[request.param]
    return _views(probe, backend, key, "lut", channels_last, place)


@pytest.fixture(scope="module", params=list(MAE_CASES))
def mae(request, probe) -> Views:
    backend, key, place = MAE_CASES[request.param]
    return _views(probe, backend, key, "mae", photometric_on=place)


@pytest.fixture(scope="module")
def torch_lut(probe) -> Views:
    return _views(probe, "torch", "folder", "lut", False)


@pytest.fixture(scope="module")
def torch_lut_statistics(probe, torch_lut) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and std of each torch view on the built-in images, averaged over REFERENCE_SEEDS runs:
    one seeded run's view-2 mean sits up to 0.1 from another's (its random jitter), too close to MEAN_TOL."""
    runs = [torch_lut] + [collect("torch", probe["folder"], "lut", seed=seed) for seed in REFERENCE_SEEDS[1:]]
    return {name: tuple(np.mean([channel_stats(builtin(v, getattr(v, name)))[i] for v in runs], axis=0) for i in (0, 1))
            for name in ("v1", "v2")}


@pytest.fixture(scope="module")
def torch_mae(probe) -> Views:
    return _views(probe, "torch", "folder", "mae")


# ---------------------------------------------------------------- measurements


def flip_rate(v: Views) -> float:
    ramps = v.v1[v.of("b_ramp")]
    half = S // 2
    slope = ramps[..., half:].mean(axis=(1, 2, 3)) - ramps[..., :half].mean(axis=(1, 2, 3))
    return float((slope < 0).mean())


def max_view1_change(v: Views) -> float:
    """Largest |view 1 - source color| over flat images: 0 up to storage error when view 1 is photometrically untouched."""
    flat = v.v1[v.of("a_flat")]
    colors = np.array([_source_color(x) for x in flat])  # nearest palette color per sample
    return float(np.abs(flat - colors[:, :, None, None]).max())


def _source_color(view: np.ndarray) -> np.ndarray:
    mean = view.mean(axis=(1, 2))
    return np.array(FLAT[int(np.argmin(((np.array(FLAT) - mean) ** 2).sum(axis=1)))], np.float64)


def strong_rates(v: Views) -> dict[str, float]:
    """Share of flat samples whose view 2 is gray / solarized / neither (blur), and jitter rate."""
    flat = v.of("a_flat")
    colors = np.array([_source_color(x) for x in v.v1[flat]])
    out = v.v2[flat].mean(axis=(2, 3))  # flat images: the mean is every pixel
    gray = np.ptp(out, axis=1) <= 3
    solarized = ~gray & (out.max(axis=1) <= 127 + 2)
    blur = ~gray & ~solarized
    # Without jitter, the op alone maps c to: luma(c) (gray), solarize(c), c (blur).
    solarized_colors = np.where(colors >= 128, 255 - colors, colors)
    plain = np.where(gray[:, None], _luma(colors)[:, None], np.where(solarized[:, None], solarized_colors, colors))
    jittered = np.abs(out - plain).max(axis=1) > PIXEL_TOL
    colorful = ~gray  # luma-preserving jitter (saturation, YIQ hue) is invisible after grayscale: rate from the rest
    return {"grayscale": gray.mean(), "solarize": solarized.mean(), "blur": blur.mean(), "jitter": jittered[colorful].mean()}


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in normalised units."""
    spec = AugSpec()
    mean, std = np.array(spec.mean) * 255, np.array(spec.std) * 255
    z = (x - mean[None, :, None, None]) / std[None, :, None, None]
    return z.mean(axis=(0, 2, 3)), z.std(axis=(0, 2, 3))


def builtin(v: Views, view: np.ndarray) -> np.ndarray:
    return view[np.isin(v.labels, [CLASSES.index(c) for c in BUILTIN_CLASSES])]


# ---------------------------------------------------------------- LUT recipe


def test_lut_layout_and_length(lut):
    n = N_FLAT + N_RAMP + 2 * 48
    assert lut.batches == n // BATCH  # last-batch policy: drop
    assert lut.v1.shape == lut.v2.shape == (EPOCHS * (n // BATCH) * BATCH, 3, S, S)
    assert lut.channels_last_ok
    assert set(np.unique(lut.labels)) == set(range(len(CLASSES)))


def test_lut_labels_match_images(lut):
    assert lut.v1[lut.of("a_flat")].std(axis=(2, 3)).max() < 3  # flat class: flat images
    ramps = lut.v1[lut.of("b_ramp")]
    assert np.abs(ramps[:, 0] - ramps[:, 1]).max() < PIXEL_TOL  # ramp class: gray
    assert (np.ptp(builtin(lut, lut.v1).mean(axis=(2, 3)), axis=1) > 10).mean() > 0.5  # built-in: colorful


def test_lut_view1_has_no_photometric_change(lut):
    assert max_view1_change(lut) <= PIXEL_TOL
    ramps = lut.v1[lut.of("b_ramp")]
    assert np.abs(ramps[:, 0] - ramps[:, 2]).max() <= PIXEL_TOL  # gray stays gray


def test_lut_flip_rate(lut):
    assert abs(flip_rate(lut) - 0.5) <= RATE_TOL


def test_lut_strong_ops_and_jitter_rates(lut):
    rates = strong_rates(lut)
    for op in ("grayscale", "solarize", "blur"):
        assert abs(rates[op] - 1 / 3) <= RATE_TOL, rates
    assert abs(rates["jitter"] - 0.8) <= RATE_TOL, rates


def test_lut_crop_geometry_matches_torch(lut, torch_lut):
    """Mean and spread of view-1 brightness on ramps = where crops land horizontally: same SRC rule."""
    for stat in (np.mean, np.std):
        got = stat(lut.v1[lut.of("b_ramp")].mean(axis=(1, 2, 3))) / 255
        ref = stat(torch_lut.v1[torch_lut.of("b_ramp")].mean(axis=(1, 2, 3))) / 255
        assert abs(got - ref) <= RAMP_TOL, (stat.__name__, got, ref)


def test_lut_channel_statistics_match_torch(lut, torch_lut_statistics):
    for name in ("v1", "v2"):
        mean, std = channel_stats(builtin(lut, getattr(lut, name)))
        ref_mean, ref_std = torch_lut_statistics[name]
        assert np.abs(mean - ref_mean).max() <= MEAN_TOL[name], (name, mean, ref_mean)
        assert np.abs(std - ref_std).max() <= STD_TOL, (name, std, ref_std)


def test_dali_operator_src_path_keeps_parity(probe, torch_lut, monkeypatch, capsys):
    """Without numba the CPU graph cuts the views with DALI operators (reflect_pad, src_crop, a mirror in the
    normalisation): the GPU graph's own path, checked here on the CPU against the same parity bounds."""
    from lut_fast.pipelines import dali_backend

    monkeypatch.setattr(dali_backend, "fused_src_available", lambda: False)
    v = collect("dali", probe["shards"], "lut")
    assert "numba is not installed" in capsys.readouterr().err
    assert max_view1_change(v) <= PIXEL_TOL
    assert abs(flip_rate(v) - 0.5) <= RATE_TOL
    rates = strong_rates(v)
    assert all(abs(rates[op] - 1 / 3) <= RATE_TOL for op in ("grayscale", "solarize", "blur")), rates
    for stat in (np.mean, np.std):
        got = stat(v.v1[v.of("b_ramp")].mean(axis=(1, 2, 3))) / 255
        ref = stat(torch_lut.v1[torch_lut.of("b_ramp")].mean(axis=(1, 2, 3))) / 255
        assert abs(got - ref) <= RAMP_TOL, (stat.__name__, got, ref)


# ---------------------------------------------------------------- MAE recipe


def test_mae_single_view(mae):
    assert mae.v2 is None and mae.v1.shape[1:] == (3, S, S)
    assert max_view1_change(mae) <= PIXEL_TOL
    assert abs(flip_rate(mae) - 0.5) <= RATE_TOL


def test_mae_crop_geometry_matches_torch(mae, torch_mae):
    for stat in (np.mean, np.std):
        got = stat(mae.v1[mae.of("b_ramp")].mean(axis=(1, 2, 3))) / 255
        ref = stat(torch_mae.v1[torch_mae.of("b_ramp")].mean(axis=(1, 2, 3))) / 255
        assert abs(got - ref) <= RAMP_TOL, (stat.__name__, got, ref)


# ---------------------------------------------------------------- epochs, resume, errors


def _batches(loader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch, start)
    return [(b.view1.clone(), b.labels.clone()) for b in loader]


def test_dali_epochs_are_deterministic_and_resumable(probe):
    loader = build_loader("dali", str(probe["folder"]), AugSpec(img_size=S), BATCH, num_workers=2, seed=3)
    first, again, resumed = _batches(loader, 1), _batches(loader, 1), _batches(loader, 1, start=2)
    assert len(first) == len(loader) and len(resumed) == len(loader) - 2
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for (x, y), (x2, y2) in zip(first[2:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = _batches(loader, 2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))  # a new order each epoch


def test_dali_ranks_get_disjoint_shards(tmp_path):
    """48 flat images, each its own red level (image i: R = 5 i + 5): view 1's color names the image."""
    folder = tmp_path / "train" / "x"
    folder.mkdir(parents=True)
    for i in range(48):
        Image.new("RGB", (40, 36), (5 * i + 5, 128, 90)).save(folder / f"{i:02d}.jpg", quality=100)
    batch, seen = 8, []
    for rank in range(2):
        loader = build_loader("dali", str(tmp_path), AugSpec(recipe="mae", img_size=S), batch, num_workers=1,
                              seed=0, rank=rank, world_size=2)
        assert len(loader) == 24 // batch
        loader.set_epoch(0)
        red = np.concatenate([_unnormalize(b.view1, loader.spec)[:, 0].mean(axis=(1, 2)) for b in loader])
        seen.append(set(np.round((red - 5) / 5).astype(int).tolist()))
    assert len(seen[0]) == len(seen[1]) == 24 and not seen[0] & seen[1]


def test_ffcv_order_per_epoch_and_resume(probe):
    loader = build_loader("ffcv", str(probe["beton"]), AugSpec(recipe="mae", img_size=S), BATCH, num_workers=2, seed=3)
    first, resumed = _batches(loader, 1), _batches(loader, 1, start=3)
    assert [y.tolist() for _, y in first[3:]] == [y.tolist() for _, y in resumed]
    assert [y.tolist() for _, y in _batches(loader, 1)] == [y.tolist() for _, y in first]


def test_ffcv_leaving_mid_epoch_stops_its_thread(probe):
    """A consumer that stops mid-epoch (a bench window, --max-steps) must not leave FFCV's epoch thread
    decoding into released memory, or running when the interpreter exits (which aborted with exit 134)."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    loader = build_loader("ffcv", str(probe["beton"]), AugSpec(recipe="lut", img_size=S), BATCH, num_workers=2, seed=3)
    loader.set_epoch(0)
    batches = loader.raw_batches()
    next(batches)
    assert any(isinstance(t, EpochIterator) and t.is_alive() for t in threading.enumerate())
    batches.close()
    assert not any(isinstance(t, EpochIterator) and t.is_alive() for t in threading.enumerate())


def test_wrong_format_for_backend_says_what_to_do(probe):
    with pytest.raises(UserError, match="lut-fast convert ffcv"):
        build_loader("ffcv", str(probe["folder"]), AugSpec(img_size=S), BATCH)
    with pytest.raises(UserError, match="--backend ffcv"):
        build_loader("dali", str(probe["beton"]), AugSpec(img_size=S), BATCH)


def test_dali_on_folder_with_corrupt_file_points_to_convert(tmp_path):
    folder = tmp_path / "train" / "x"
    folder.mkdir(parents=True)
    for i in range(BATCH):
        Image.new("RGB", (40, 40), (i * 10, 50, 90)).save(folder / f"{i}.jpg")
    (folder / "0.jpg").write_bytes((folder / "1.jpg").read_bytes()[:200])
    loader = build_loader("dali", str(tmp_path), AugSpec(img_size=S), BATCH, num_workers=1)
    loader.set_epoch(0)
    with pytest.raises(UserError, match="lut-fast convert dali"):
        list(loader)


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_missing_backend_says_how_to_install(monkeypatch, backend):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("ffcv", "nvidia.dali") else real(name, *a))
    with pytest.raises(UserError, match="pip install"):
        build_loader(backend, None, AugSpec(img_size=S), BATCH)


def test_ffcv_bicubic_enlargement_matches_pil():
    """Images stored below S are enlarged by FFCV's numba kernel with PIL's bicubic, within one level."""
    from lut_fast.pipelines import ffcv_ops as F

    small = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    big = np.empty((45, 61, 3), np.uint8)
    F.resize_bicubic_up(small, big, np.empty(45 * 61 * 3, np.float32))
    pil = np.asarray(Image.fromarray(small).resize((61, 45), Image.BICUBIC))
    assert np.abs(big.astype(int) - pil).max() <= 1


def test_dali_reflect_pad_matches_numpy():
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from lut_fast.pipelines.dali_backend import reflect_pad

    arr = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)

    @pipeline_def
    def pad():
        return reflect_pad(fn.external_source(source=lambda: [arr], batch=True, layout="HWC"), 7, 9, 4)

    pipe = pad(batch_size=1, num_threads=1, device_id=None)
    pipe.build()
    np.testing.assert_array_equal(np.array(pipe.run()[0][0]), np.pad(arr, ((4, 4), (4, 4), (0, 0)), mode="reflect"))


def test_dali_cpu_src_views_match_numpy_reflect_pad_crop_and_flip():
    """The CPU graph's fused SRC operator = numpy 'reflect' padding, the S x S window at the drawn offset, mirror."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from lut_fast.pipelines.dali_backend import src_views_cpu

    spec = AugSpec(img_size=16, src_padding=4, flip_p=0.5)
    rng = np.random.default_rng(0)
    # shorter side = S (every window touches the padding) or a little more; either orientation
    shapes = [(16, 16), (16, 23), (23, 16), (19, 40), (16, 17), (30, 18)] * 4
    images = [rng.integers(0, 256, (*hw, 3)).astype(np.uint8) for hw in shapes]
    draws = rng.random((len(images), 6)).astype(np.float32)
    draws[::3, [0, 1, 3]] = 0.0  # the first offsets
    draws[1::3, [1, 3, 4]] = np.float32(1 - 2**-24)  # the last offsets
    draws[:, [2, 5]] = np.where(np.arange(len(images))[:, None] % 2 == 0, 0.25, 0.75)  # both flip outcomes

    @pipeline_def
    def views():
        img = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return src_views_cpu(img, spec, fn.external_source(source=lambda: list(draws), batch=True))

    pipe = views(batch_size=len(images), num_threads=2, device_id=None)
    pipe.build()
    out = pipe.run()
    s, p = spec.img_size, spec.src_padding
    for i, img in enumerate(images):
        padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode="reflect")
        for v in range(2):
            n_top, n_left = padded.shape[0] - s + 1, padded.shape[1] - s + 1
            top = min(int(np.floor(draws[i, 3 * v] * n_top)), n_top - 1)
            left = min(int(np.floor(draws[i, 3 * v + 1] * n_left)), n_left - 1)
            want = padded[top:top + s, left:left + s]
            if draws[i, 3 * v + 2] < spec.flip_p:
                want = want[:, ::-1]
            np.testing.assert_array_equal(np.array(out[v][i]), want, err_msg=f"image {i} {img.shape}, view {v + 1}")


def test_dali_cpu_shorter_side_shrink_is_the_shared_area_filter():
    """The CPU graph (numba available) shrinks the shorter side to S with ``area_resize.resize_area`` (FFCV's
    filter, OpenCV's INTER_AREA weights): equal to the kernel, and to OpenCV within test_ffcv_ops' tolerance;
    an image at S passes unchanged, a smaller one is enlarged by ``fn.resize`` to the same rounded size."""
    import io

    import cv2
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def
    from PIL import Image

    from lut_fast.pipelines.area_resize import resize_area
    from lut_fast.pipelines.dali_backend import decode, resize_shorter

    spec = AugSpec(img_size=16)
    rng = np.random.default_rng(4)
    # (shape, resized shape): shrinks in both orientations at non-integer and integer factors, S, an enlargement
    cases = [((40, 50), (16, 20)), ((50, 33), (24, 16)), ((32, 64), (16, 32)), ((16, 30), (16, 30)),
             ((12, 20), (16, 27))]
    jpegs = []
    for (h, w), _ in cases:
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        img[:, : w // 2] = np.linspace(0, 255, w // 2, dtype=np.uint8)[None, :, None]  # smooth too
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        jpegs.append(np.frombuffer(buf.getvalue(), np.uint8))

    @pipeline_def(enable_conditionals=True)
    def shorter_side():
        data = fn.external_source(source=lambda: jpegs, batch=True)
        images = decode(data, "cpu")
        resized, _, _ = resize_shorter(data, images, spec, need_size=False)
        return images, resized

    pipe = shorter_side(batch_size=len(jpegs), num_threads=2, device_id=None)
    pipe.build()
    decoded, resized = pipe.run()
    for i, ((h, w), (nh, nw)) in enumerate(cases):
        src, got = np.array(decoded[i]), np.array(resized[i])
        assert got.shape == (nh, nw, 3), (i, got.shape)
        if min(h, w) == spec.img_size:
            np.testing.assert_array_equal(got, src)
        elif min(h, w) > spec.img_size:
            kernel = np.empty((nh, nw, 3), np.uint8)
            resize_area(src, 0, h, 0, w, kernel, np.empty(3 * w, np.float32))
            np.testing.assert_array_equal(got, kernel, err_msg=f"image {i} {src.shape}")
            diff = np.abs(got.astype(int) - cv2.resize(src, (nw, nh), interpolation=cv2.INTER_AREA))
            assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (i, diff.max(), np.mean(diff > 0))


def test_dali_cpu_mae_square_flip_is_the_shared_resize_then_a_mirror():
    """MAE's crops on the CPU: one numba operator resizes them to S x S with ``area_resize.resize_area`` (area
    filter where a side shrinks, bicubic where it grows) and mirrors about half of them; each output is exactly
    the kernel's result, or that result mirrored."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from lut_fast.pipelines.area_resize import resize_area
    from lut_fast.pipelines.dali_backend import square_flip_cpu

    spec = AugSpec(recipe="mae", img_size=16)
    rng = np.random.default_rng(5)
    shapes = [(40, 50), (16, 30), (33, 17), (64, 64), (20, 90), (16, 16), (9, 12), (12, 40)] * 6
    images = [rng.integers(0, 256, (*hw, 3)).astype(np.uint8) for hw in shapes]

    @pipeline_def
    def square():
        return square_flip_cpu(fn.external_source(source=lambda: images, batch=True, layout="HWC"), spec)

    pipe = square(batch_size=len(images), num_threads=2, device_id=None, seed=3)
    pipe.build()
    (out,) = pipe.run()
    flips = 0
    for i, src in enumerate(images):
        got = np.array(out[i])
        kernel = np.empty((16, 16, 3), np.uint8)
        resize_area(src, 0, src.shape[0], 0, src.shape[1], kernel, np.empty(3 * src.shape[1], np.float32))
        mirrored = np.array_equal(got, kernel[:, ::-1])
        assert mirrored or np.array_equal(got, kernel), (i, src.shape)
        flips += mirrored
    assert 0.2 < flips / len(images) < 0.8, flips


@pytest.mark.parametrize("backend,key", [("ffcv", "beton"), ("dali", "shards")])
def test_device_mode_hands_over_uint8_and_resumable_params(probe, backend, key):
    """photometric_on=device: raw batches are uint8 NCHW with view 2's parameters, which depend on (seed, epoch,
    batch index) only: a resumed epoch gets the same parameters for the same batches."""
    from lut_fast.pipelines import photometric

    loader = build_loader(backend, str(probe[key]), AugSpec(img_size=S), BATCH, num_workers=2, seed=5,
                          photometric_on="device")
    loader.set_epoch(1)
    full = list(loader.raw_batches())
    for raw in full:
        assert raw.view1.dtype == raw.view2.dtype == torch.uint8 and raw.view1.shape == (BATCH, 3, S, S)
        assert raw.strong_params.shape == (BATCH, photometric.NUM_PARAMS)
    loader.set_epoch(1, start_batch=2)
    resumed = list(loader.raw_batches())
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a.strong_params, b.strong_params)
    assert not torch.equal(full[0].strong_params, full[1].strong_params)
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader.raw_batches())).strong_params, full[0].strong_params)


@pytest.mark.parametrize("channels_last", [False, True])
def test_dali_cpu_graph_view2_is_finish_batchs(probe, channels_last):
    """With numba, DALI's CPU graph runs view 2's ops as one compiled operator fed the parameters that
    photometric_on=device hands to finish_batch for the same batch: the two make the same views up to the
    rounding to whole levels (within half a level; one more on a few pixels in a thousand, where the compiled
    ops and the torch ops round a value near a half level apart), resumed epochs included."""
    from lut_fast.pipelines import dali_backend

    assert dali_backend.fused_src_available()
    spec = AugSpec(img_size=S)

    def views(photometric_on: str, start_batch: int = 0) -> list:
        loader = build_loader("dali", str(probe["shards"]), spec, BATCH, num_workers=2, seed=5,
                              channels_last=channels_last, photometric_on=photometric_on)
        loader.set_epoch(1, start_batch=start_batch)
        return [(_unnormalize(b.view1, spec), _unnormalize(b.view2, spec)) for b in loader]

    in_graph, on_device = views("loader"), views("device")
    assert len(in_graph) == len(on_device) >= 3
    for (g1, g2), (d1, d2) in zip(in_graph, on_device):
        assert np.abs(g1 - d1).max() < 1e-3  # same crops and flips, same normalisation
        # finish_batch leaves view 2 unrounded (float ops on the device); the CPU loader rounds to whole levels
        level = np.abs(g2 - d2)
        assert level.max() < 1.5 + 1e-3 and np.mean(level > 0.5 + 1e-3) < 1e-3, (level.max(), np.mean(level > 0.501))
    for (a1, a2), (b1, b2) in zip(in_graph[2:], views("loader", start_batch=2)):
        assert np.array_equal(a1, b1) and np.array_equal(a2, b2)


def test_ffcv_thread_failure_reaches_the_training_loop(probe, monkeypatch):
    """An exception in FFCV's loader thread used to end the thread and leave the consumer waiting on its queue
    forever (a numba dispatch error did, with nothing printed); now the next batch raises it."""
    from lut_fast.pipelines import ffcv_backend

    run_pipeline = ffcv_backend.EpochIterator.run_pipeline

    def fail_on_batch_two(self, b_ix, *args, **kwargs):
        if b_ix == 2:
            raise ValueError("boom")
        return run_pipeline(self, b_ix, *args, **kwargs)

    monkeypatch.setattr(ffcv_backend.EpochIterator, "run_pipeline", fail_on_batch_two)
    loader = build_loader("ffcv", str(probe["beton"]), AugSpec(img_size=S), BATCH, num_workers=2, seed=0)
    got = []
    with pytest.raises(RuntimeError, match="FFCV's loader thread failed: ValueError: boom") as info:
        for batch in loader:
            got.append(batch)
    assert len(got) == 2 and isinstance(info.value.__cause__, ValueError)


def test_bad_beton_files_are_one_line_errors(probe, tmp_path):
    """Empty, truncated and foreign files named .beton: a UserError before FFCV reads them."""
    good = probe["beton"].read_bytes()
    cases = {"empty.beton": b"", "truncated.beton": good[: len(good) // 2], "text.beton": b"not a beton\n" * 100,
             "header-only.beton": good[:40]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="not a usable FFCV .beton") as e:
            build_loader("ffcv", str(tmp_path / name), AugSpec(img_size=S), BATCH)
        assert "\n" not in str(e.value)


def test_storage_too_small_for_the_recipe_warns_once(probe, capsys):
    from lut_fast.pipelines import formats

    for key, backend in (("shards_at_s", "dali"), ("beton_at_s", "ffcv"), ("folder_at_s", "torch"), ("folder_at_s", "dali")):
        formats._warned.clear()  # once per data, recipe and size in a process: each backend must say it itself
        meta = formats.stored_metadata(probe[key])
        assert meta["shorter_side"] == S and meta["num_samples"] == N_FLAT + N_RAMP + 2 * 48
        assert meta["source"] == str(probe["folder"] / "train") and meta["quality"] == 95
        build_loader(backend, str(probe[key]), AugSpec(img_size=S), BATCH, num_workers=1)  # LUT at S: fine
        assert "warning" not in capsys.readouterr().err
        for _ in range(2):
            build_loader(backend, str(probe[key]), AugSpec(recipe="mae", img_size=S), BATCH, num_workers=1)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "RandomResizedCrop" in err[0] and f"--shorter-side {2 * S}" in err[0], err
        build_loader(backend, str(probe[key]), AugSpec(img_size=2 * S), BATCH, num_workers=1)
        assert "below the image size" in capsys.readouterr().err
    assert formats.stored_metadata(probe["folder"]) is None
    assert formats.stored_metadata(probe["beton"])["shorter_side"] is None


def test_torch_reading_storage_at_s_never_resizes(probe, monkeypatch):
    """Every probe image is larger than S, so `convert folder --shorter-side S` stored each with its shorter
    side at S, and the torch backend's LUT views are windows of the decoded image: no resize runs."""
    from lut_fast.pipelines import torch_backend

    def no_resize(*args, **kwargs):
        raise AssertionError("resized an image stored at the view size")

    monkeypatch.setattr(torch_backend, "_resize", no_resize)
    for place in ("loader", "device"):
        loader = build_loader("torch", str(probe["folder_at_s"]), AugSpec(img_size=S), BATCH, num_workers=0,
                              photometric_on=place)
        assert next(iter(loader)).view1.shape == (BATCH, 3, S, S)
