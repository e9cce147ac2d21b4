"""View 2's photometric ops (photometric.py) on inputs whose answers can be checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode

from lut_fast.pipelines import photometric as ph
from lut_fast.pipelines.spec import STRONG_OPS, AugSpec

SPEC = AugSpec(img_size=32)
NONE = -1  # STRONG_OP value: none of the three ops


def params_for(n, jitter_on=1.0, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, strong_op=NONE, blur_sigma=1.0):
    p = torch.zeros(n, ph.NUM_PARAMS)
    for col, v in ((ph.JITTER_ON, jitter_on), (ph.BRIGHTNESS, brightness), (ph.CONTRAST, contrast),
                   (ph.SATURATION, saturation), (ph.HUE, hue), (ph.STRONG_OP, strong_op), (ph.BLUR_SIGMA, blur_sigma)):
        p[:, col] = torch.as_tensor(v, dtype=torch.float32)
    return p


def test_identity_factors_leave_the_image_unchanged():
    x = torch.rand(3, 3, 16, 16)
    out = ph.apply_strong(x, params_for(3), SPEC)
    assert torch.allclose(out, x, atol=1e-6)
    m, k = ph.jitter_matrix(params_for(1))
    assert torch.allclose(m[0], torch.eye(3, dtype=torch.float64), atol=1e-12) and k.abs().max() < 1e-12


def test_jitter_off_is_exactly_the_input():
    x = torch.rand(2, 3, 8, 8)
    out = ph.apply_strong(x, params_for(2, jitter_on=0.0, brightness=1.4, hue=0.1), SPEC)
    assert torch.equal(out, x)


def test_each_factor_on_hand_checked_colours():
    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    y = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6  # luma of the colour (also the image's mean luma)
    bright = ph.apply_strong(x, params_for(1, brightness=1.5), SPEC)
    assert torch.allclose(bright[0, :, 0, 0], torch.tensor([0.3, 0.6, 0.9]), atol=1e-6)
    flat = ph.apply_strong(x, params_for(1, contrast=0.0), SPEC)  # contrast 0: the mean luma everywhere
    assert torch.allclose(flat, torch.full_like(x, y), atol=1e-6)
    gray = ph.apply_strong(x, params_for(1, saturation=0.0), SPEC)  # saturation 0: the pixel's luma
    assert torch.allclose(gray, torch.full_like(x, y), atol=1e-6)
    over = ph.apply_strong(x, params_for(1, brightness=2.0), SPEC)  # clamped once, at the end
    assert torch.allclose(over[0, :, 0, 0], torch.tensor([0.4, 0.8, 1.0]), atol=1e-6)


def test_hue_rotation_keeps_luma_and_grays_and_turns_red_towards_green():
    x = torch.rand(4, 3, 8, 8) * 0.5 + 0.25
    turned = ph.adjust_hue(x, torch.full((4,), 0.1), clamp=False)
    assert torch.allclose(ph.luma(turned), ph.luma(x), atol=1e-5)
    grays = torch.rand(2, 1, 4, 4).expand(-1, 3, -1, -1)
    assert torch.allclose(ph.adjust_hue(grays, torch.tensor([0.3, -0.2])), grays, atol=1e-6)
    full_turn = ph.adjust_hue(x, torch.ones(4), clamp=False)
    assert torch.allclose(full_turn, x, atol=1e-5)
    red = torch.tensor([0.8, 0.2, 0.0]).view(1, 3, 1, 1)
    r, g, b = ph.adjust_hue(red, torch.tensor([1 / 3]))[0, :, 0, 0]  # a third of a turn: green dominates
    assert g > r and g > b


def test_composed_matrix_equals_the_ops_one_by_one_without_clamping():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 12, 12)
    p = params_for(5, brightness=torch.rand(5) * 0.8 + 0.6, contrast=torch.rand(5) * 0.8 + 0.6,
                   saturation=torch.rand(5) * 0.4 + 0.8, hue=torch.rand(5) * 0.2 - 0.1)
    m, k = ph.jitter_matrix(p)
    composed = ph._apply_matrix(x, m) + ph.jitter_offset(k, ph.mean_colour(x)).view(5, 3, 1, 1)
    ops = [(ph.adjust_brightness, ph.BRIGHTNESS), (ph.adjust_contrast, ph.CONTRAST),
           (ph.adjust_saturation, ph.SATURATION), (ph.adjust_hue, ph.HUE)]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):  # any order: the four maps commute
        y = x
        for i in order:
            op, col = ops[i]
            y = op(y, p[:, col], clamp=False)
        assert torch.allclose(composed, y, atol=1e-5), order
    # ... and apply_strong is that map, clamped once
    assert torch.allclose(ph.apply_strong(x, p, SPEC), composed.clamp(0, 1), atol=1e-5)


def test_grayscale_solarize_and_blur_match_their_definitions():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    gray = ph.apply_strong(x, params_for(1, jitter_on=0.0, strong_op=STRONG_OPS.index("grayscale")), SPEC)[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    ref = np.asarray(img.convert("L"), dtype=np.float64)
    assert np.abs(gray[0].mul(255).numpy() - ref).max() <= 1.0
    sol = ph.apply_strong(x, params_for(1, jitter_on=0.0, strong_op=STRONG_OPS.index("solarize")), SPEC)
    sol = sol[0].permute(1, 2, 0).mul(255).round().byte().numpy()
    assert np.array_equal(sol, np.asarray(ImageOps.solarize(img, 128)))
    sigma = 1.5
    blurred = ph.apply_strong(x, params_for(1, jitter_on=0.0, strong_op=STRONG_OPS.index("blur"), blur_sigma=sigma), SPEC)
    ref = np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float64)
    inner = (slice(6, -6), slice(6, -6))  # PIL and reflect padding differ only at the border
    assert np.abs(blurred[0].permute(1, 2, 0).mul(255).numpy()[inner] - ref[inner]).mean() < 3.0


def test_solarize_threshold_on_the_0_255_scale():
    values = torch.tensor([0.0, 127.0, 127.4, 127.6, 128.0, 255.0]).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = ph.solarize(values, 128, value_range=255.0)[0, 0, 0]
    assert out.tolist() == pytest.approx([0.0, 127.0, 127.4, 127.4, 127.0, 0.0])
    assert torch.allclose(ph.solarize(values / 255, 128), ph.solarize(values, 128, 255.0) / 255)


def test_blur_window_per_image_and_constant_images():
    assert ph.blur_window(torch.tensor([0.1, 0.33, 0.34, 1.5, 2.0])).tolist() == [3, 3, 5, 11, 13]
    const = torch.full((2, 3, 20, 20), 0.25)
    assert torch.allclose(ph.gaussian_blur(const, torch.tensor([0.3, 2.0])), const, atol=1e-6)
    # each image over its own window: the same as blurring it alone with that window
    x = torch.rand(2, 3, 20, 20)
    sigma = torch.tensor([0.3, 2.0])
    both = ph.gaussian_blur(x, sigma)
    for i, width in enumerate(ph.blur_window(sigma).tolist()):
        assert torch.allclose(both[i], ph.gaussian_blur(x[i : i + 1], sigma[i : i + 1], width)[0], atol=1e-6)


def test_value_range_255_equals_unit_range():
    x = torch.randint(0, 256, (9, 3, 16, 16)).float()
    p = ph.sample_params(AugSpec(), 9, torch.Generator().manual_seed(1))
    unit = ph.apply_strong(x / 255, p, SPEC)
    scaled = ph.apply_strong(x, p, SPEC, value_range=255.0)
    assert torch.allclose(unit * 255, scaled, atol=1e-3)
    as_uint8 = ph.apply_strong_uint8(x.byte(), p, SPEC)
    assert (as_uint8.float() - scaled).abs().max() <= 0.5 + 1e-3


def test_parameter_sampling_rates():
    p = ph.sample_params(AugSpec(), 6000, torch.Generator().manual_seed(0))
    assert p[:, ph.JITTER_ON].mean().item() == pytest.approx(0.8, abs=0.02)
    for i in range(len(STRONG_OPS)):
        assert (p[:, ph.STRONG_OP] == i).float().mean().item() == pytest.approx(1 / 3, abs=0.02)
    assert p[:, ph.BRIGHTNESS].min() >= 0.6 and p[:, ph.BRIGHTNESS].max() <= 1.4
    assert p[:, ph.SATURATION].min() >= 0.8 and p[:, ph.SATURATION].max() <= 1.2
    assert p[:, ph.HUE].abs().max() <= 0.1 and p[:, ph.HUE].std() > 0.05
    assert p[:, ph.BLUR_SIGMA].min() >= 0.1 and p[:, ph.BLUR_SIGMA].max() <= 2.0
    only_blur = ph.sample_params(AugSpec(strong_ops=("blur",)), 50)
    assert (only_blur[:, ph.STRONG_OP] == STRONG_OPS.index("blur")).all()


def test_device_stage_keeps_any_memory_format():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    p = ph.sample_params(AugSpec(), 4, torch.Generator().manual_seed(3))
    planar = ph.apply_strong_uint8(x, p, SPEC)
    nhwc = ph.apply_strong_uint8(x.contiguous(memory_format=torch.channels_last), p, SPEC)
    assert torch.equal(planar, nhwc)


class _CrossDeviceCopies(TorchDispatchMode):
    """Records every copy of a host tensor to another device: (shape, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and out.device.type != "cpu":
            self.copies.append((tuple(args[0].shape), kwargs.get("non_blocking", False)))
        return out


def test_device_stage_queues_every_copy_without_waiting():
    """finish_batch sends its views, labels, view 2's parameters, indices and kernels as non-blocking copies.

    A blocking copy (or one from pageable memory, which ``batch.to_device`` pins first on CUDA) waits for
    the GPU to finish the step already queued, so the trainer could not run a step ahead. The 'meta'
    device stands in for the GPU here: it runs the same code path with every op but no data.
    """
    from lut_fast.pipelines.batch import RawBatch, finish_batch

    spec = AugSpec(img_size=32)
    g = torch.Generator().manual_seed(0)
    n = 16
    x = torch.randint(0, 256, (2, n, 3, 32, 32), dtype=torch.uint8, generator=g)
    params = ph.sample_params(spec, n, g)
    params[:, ph.JITTER_ON] = 1.0
    params[:, ph.STRONG_OP] = torch.arange(n) % 4 - 1  # none, grayscale, solarize and blur all occur
    with _CrossDeviceCopies() as seen:
        batch = finish_batch(RawBatch(x[0], x[1], torch.arange(n), params), spec, "meta", channels_last=True)
    assert batch.view2.device.type == "meta" and batch.view2.shape == (n, 3, 32, 32)
    assert len(seen.copies) >= 6  # views, labels, jitter matrix and offset, op indices, blur kernels
    assert all(non_blocking for _, non_blocking in seen.copies), seen.copies


def test_hue_sign_is_a_fraction_of_a_turn():
    m = ph.hue_matrix(torch.tensor([0.25]))[0]
    # a quarter turn of the chroma plane: applying it four times is the identity
    assert torch.allclose(torch.linalg.matrix_power(m, 4), torch.eye(3, dtype=torch.float64), atol=1e-9)
    assert not torch.allclose(m, torch.eye(3, dtype=torch.float64), atol=0.1)
    assert math.isclose(float(m.sum(1).mean()), 1.0, abs_tol=1e-9)  # grays stay put: rows sum to 1


def test_cpu_blur_equals_the_devices_grouped_convolution():
    """The CPU's shifted-slice blur and the batched convolution other devices run give the same images."""
    x = torch.rand(5, 3, 20, 23, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.4, 1.0, 1.7, 2.0])
    halves = (ph.blur_window(sigma) // 2).tolist()
    half = max(halves)
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-(coords**2) / (2 * sigma.double().view(-1, 1) ** 2)) * (coords.abs() <= torch.tensor(halves).view(-1, 1))
    k = k / k.sum(1, keepdim=True)
    assert torch.allclose(ph._blur_shifted(x, k, halves), ph._blur_grouped_conv(x, k), atol=1e-5)
    assert torch.allclose(ph.gaussian_blur(x, sigma), ph._blur_grouped_conv(x, k), atol=1e-5)
    assert not torch.allclose(ph.gaussian_blur(x, sigma)[3], x[3], atol=1e-2)  # it does blur


def test_uint8_ops_in_chunks_equal_the_whole_batch(monkeypatch):
    spec = AugSpec()
    x = torch.randint(0, 256, (11, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    p = ph.sample_params(spec, 11, torch.Generator().manual_seed(3))
    monkeypatch.setattr(ph, "CPU_CHUNK", 4)  # 4 + 4 + 3
    chunked = ph.apply_strong_uint8(x, p, spec)
    monkeypatch.setattr(ph, "CPU_CHUNK", 64)
    whole = ph.apply_strong_uint8(x, p, spec)
    assert torch.equal(chunked, whole) and not torch.equal(whole, x)
    in_place = x.clone()
    assert ph.apply_strong_uint8(in_place, p, spec, out=in_place) is in_place and torch.equal(in_place, whole)


def test_compiled_cpu_ops_equal_the_torch_ops(monkeypatch):
    """The CPU loader's one-pass numba kernel (photometric_numba.py) against the torch ops it stands in for:
    the same whole levels, except a value within float rounding of a half level (at most one level apart)."""
    pytest.importorskip("numba")  # the dali / ffcv / fast extras bring it; CI installs them
    spec = AugSpec(img_size=48)
    g = torch.Generator().manual_seed(7)
    n = 48
    coarse = torch.rand(n, 3, 6, 6, generator=g) * 255  # smooth images with detail, as photographs are
    x = F.interpolate(coarse, size=(48, 48), mode="bilinear").add_(torch.rand(n, 3, 48, 48, generator=g) * 20)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    params = ph.sample_params(spec, n, g)
    params[:, ph.STRONG_OP] = torch.arange(n) % 4 - 1  # none, grayscale, solarize, blur
    params[: n // 2, ph.JITTER_ON] = 1.0
    assert ph._numba_kernels() is not None
    compiled = ph.apply_strong_uint8(x, params, spec)
    assert torch.equal(ph.apply_strong_uint8(x.contiguous(memory_format=torch.channels_last), params, spec), compiled)
    monkeypatch.setattr(ph, "_NUMBA", None)  # numba not installed: the torch ops
    reference = ph.apply_strong_uint8(x, params, spec)
    diff = (compiled.int() - reference.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    assert not torch.equal(compiled, x)  # the ops did something


@pytest.mark.parametrize("spec", [AugSpec(), AugSpec(jitter_p=0.3, brightness=0.9, hue=0.4, strong_ops=("blur",)),
                                  AugSpec(strong_ops=("solarize", "grayscale"), blur_sigma=(0.5, 0.6))])
def test_packed_parameters_drawn_in_compiled_code_equal_the_hosts(spec):
    """FFCV's threads turn their own uniforms into the compiled ops' parameters (``packed_from_uniforms``):
    the same numbers as the host's ``packed_params(params_from_uniforms(...))`` for the same uniforms."""
    pytest.importorskip("numba")
    from lut_fast.pipelines import photometric_numba as pn

    u = np.random.default_rng(11).random((300, ph.NUM_UNIFORMS))
    u[:3, 0], u[3:6, 5], u[6, :] = spec.jitter_p, 0.999999, 0.0  # edges: jitter threshold, last op, all zeros
    host = pn.packed_params(ph.params_from_uniforms(spec, u))
    strengths = np.array([spec.brightness, spec.contrast, spec.saturation, spec.hue])
    ops = np.array([STRONG_OPS.index(op) for op in spec.strong_ops], np.int64)
    drawn = np.full((len(u), pn.packed_width(spec)), np.nan, np.float32)
    for row, ui in zip(drawn, u):
        pn.packed_from_uniforms(ui, spec.jitter_p, strengths, ops, spec.blur_sigma[0], spec.blur_sigma[1], row)
    no_blur = drawn[:, pn.PACK_OP] != pn.BLUR
    host[no_blur, pn.PACK_TAPS :] = 0.0  # weights the kernel never reads (no blur): the host leaves some there
    w = min(host.shape[1], drawn.shape[1])  # past that, both rows hold zeros only
    assert not host[:, w:].any() and not drawn[:, w:].any()
    np.testing.assert_allclose(drawn[:, :w], host[:, :w], rtol=2e-7, atol=1e-8)
    assert np.array_equal(drawn[:, pn.PACK_OP], host[:, pn.PACK_OP])
    assert np.array_equal(drawn[:, pn.PACK_HALF], host[:, pn.PACK_HALF])


def test_compiled_normalisation_gives_the_same_floats(monkeypatch):
    """The CPU-only loader's compiled normalisation (view 1) and view 2's ops written normalised in the same
    pass equal the torch passes bit for bit (the same two roundings), into planar or channels-last memory."""
    pytest.importorskip("numba")
    from lut_fast.pipelines.batch import normalize_into

    spec = AugSpec(img_size=40)
    g = torch.Generator().manual_seed(3)
    n = 12
    x = torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=g)
    params = ph.sample_params(spec, n, g)
    params[:, ph.STRONG_OP] = torch.arange(n) % 4 - 1

    def run():
        view1 = normalize_into(torch.empty(n, 3, 40, 40), x, spec)
        planar = torch.empty(n, 3, 40, 40)
        ph.apply_strong_normalised(x, params, spec, planar)
        nhwc = torch.empty(n, 40, 40, 3).permute(0, 3, 1, 2)
        ph.apply_strong_normalised(x, params, spec, nhwc)
        assert torch.equal(planar, nhwc)
        return view1, planar

    assert ph._numba_kernels() is not None
    compiled = run()
    compiled_rounded = ph.apply_strong_uint8(x, params, spec)
    monkeypatch.setattr(ph, "_NUMBA", None)
    torch_ops = run()
    assert torch.equal(compiled[0], torch_ops[0])
    # view 2: both paths normalise their own rounded levels the same way
    assert torch.equal(compiled[1], normalize_into(torch.empty(n, 3, 40, 40), compiled_rounded, spec))
