"""The torch backend and the batched photometric ops against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from lut_fast.datasets.builtin import builtin_path
from lut_fast.datasets.imagefolder import scan_image_folder
from lut_fast.pipelines import build_loader
from lut_fast.pipelines import photometric as ph
from lut_fast.pipelines.spec import STRONG_OPS, AugSpec
from lut_fast.pipelines.torch_backend import DualViewDataset, EpochSampler

SPEC = AugSpec(img_size=32)


def params_for(n, **cols):
    p = torch.zeros(n, ph.NUM_PARAMS)
    p[:, ph.BRIGHTNESS : ph.HUE] = 1.0
    p[:, ph.ORDER] = torch.arange(4).float()
    p[:, ph.STRONG_OP] = -1  # none of the three
    for k, v in cols.items():
        p[:, getattr(ph, k.upper())] = v
    return p


def test_identity_parameters_leave_the_image_unchanged():
    x = torch.rand(3, 3, 16, 16)
    out = ph.apply_strong(x, params_for(3, jitter_on=1.0, hue=0.0), SPEC)
    assert torch.allclose(out, x, atol=1e-5)


def test_ops_match_pil_definitions():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    sol = ph.solarize(x, 128)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
    assert np.array_equal(sol, np.asarray(ImageOps.solarize(img, 128)))
    gray = ph.grayscale(x)[0].mul(255).numpy()
    ref = np.asarray(img.convert("L"), dtype=np.float64)
    assert np.abs(gray[0] - ref).max() <= 1.0 and np.array_equal(gray[0], gray[2])
    blurred = ph.gaussian_blur(x, torch.tensor([1.5]), SPEC.blur_kernel_size)[0].permute(1, 2, 0).mul(255).numpy()
    ref = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    inner = (slice(6, -6), slice(6, -6))  # PIL and reflect padding differ only at the border
    assert np.abs(blurred[inner] - ref[inner]).mean() < 3.0
    bright = ph.adjust_brightness(x, torch.tensor([1.3]))
    assert torch.allclose(bright, (x * 1.3).clamp(0, 1))
    hue_round = ph._hsv_to_rgb(ph._rgb_to_hsv(x))
    assert torch.allclose(hue_round, x, atol=1e-5)


def test_parameter_sampling_rates():
    p = ph.sample_params(AugSpec(), 6000, torch.Generator().manual_seed(0))
    assert p[:, ph.JITTER_ON].mean().item() == pytest.approx(0.8, abs=0.02)
    for i in range(len(STRONG_OPS)):
        assert (p[:, ph.STRONG_OP] == i).float().mean().item() == pytest.approx(1 / 3, abs=0.02)
    assert p[:, ph.BRIGHTNESS].min() >= 0.6 and p[:, ph.BRIGHTNESS].max() <= 1.4
    assert p[:, ph.HUE].abs().max() <= 0.1
    assert torch.all(p[:, ph.ORDER].sort(1).values == torch.arange(4).float())


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


def test_augmentations_depend_only_on_seed_epoch_index():
    samples = scan_image_folder(builtin_path()).samples[:4]
    ds = DualViewDataset(samples, SPEC, seed=3)
    a, b = ds[(1, 2)], ds[(1, 2)]
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["params"], b["params"])
    assert not torch.equal(ds[(2, 2)]["view2"], a["view2"]) or not torch.equal(ds[(2, 2)]["params"], a["params"])


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
    worker = build_loader("torch", None, spec, batch_size=8, num_workers=0, photometric_on="worker")
    device = build_loader("torch", None, spec, batch_size=8, num_workers=0, photometric_on="device")
    a, b = next(iter(worker)), next(iter(device))
    assert torch.equal(a.view1, b.view1)
    # the worker path rounds to uint8; the device path stays float
    assert (a.view2 - b.view2).abs().max().item() < 2.0 / 255 / min(spec.std) + 1e-4
