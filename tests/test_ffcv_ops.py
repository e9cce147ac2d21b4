"""FFCV view 2's fused kernel against the one-op kernels it replaces (which test_backends.py checks against the
torch ops), for every jitter order and every 3-augment op; and the table-driven normalisation of CPU-only
runs against the plain formula."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lut_fast.pipelines import ffcv_ops as F
from lut_fast.pipelines.spec import AugSpec

SCALE, SHIFT = F.normalization(AugSpec())
FACTORS = np.array([1.3, 0.6, 1.4, 0.07])  # brightness, contrast, saturation, hue turns: all far from identity


def one_op_at_a_time(src: np.ndarray, jitter: bool, order, op: int, sigma: float, max_half: int) -> np.ndarray:
    """View 2 as the one-op kernels compose it: float copy, each op over the whole image, on 0..255."""
    x = np.empty(src.shape, np.float32)
    F._to_float(src, x)
    jitter_ops = (lambda: F._brightness(x, FACTORS[0]), lambda: F._contrast(x, FACTORS[1]),
                  lambda: F._saturation(x, FACTORS[2]), lambda: F._hue(x, FACTORS[3]))
    for j in order if jitter else ():
        jitter_ops[j]()
    if op == F.GRAYSCALE:
        F._grayscale(x)
    elif op == F.SOLARIZE:
        F._solarize(x, 128.0)
    else:
        F._blur(x, np.empty_like(x), sigma, min(max_half, int(np.ceil(3 * sigma)), (min(src.shape[:2]) - 1) // 2))
    return x


@pytest.mark.parametrize("shape,sigma", [((20, 23), 1.3), ((9, 30), 2.0), ((16, 16), 0.1)])
def test_fused_view2_equals_the_one_op_composition(shape, sigma):
    rng = np.random.default_rng(0)
    # strided like the decoder's (batch, view, h, w, 3) buffer that StrongView reads
    src = rng.integers(0, 256, (2, 2, *shape, 3)).astype(np.uint8)[1, 1]
    h, w = shape
    cases = [(False, (0, 1, 2, 3))] + [(True, order) for order in itertools.permutations(range(4))]
    for (jitter, order), op in itertools.product(cases, (F.GRAYSCALE, F.SOLARIZE, F.BLUR)):
        ref = one_op_at_a_time(src, jitter, order, op, sigma, 6)
        where = f"jitter={jitter} order={order} op={F.STRONG_OPS[op]}"
        args = (jitter, FACTORS, np.array(order, np.int64), op, sigma, 128.0, 6)
        as_uint8 = np.empty((h, w, 3), np.uint8)
        F.strong_view_fused(src, as_uint8, *args)
        rounded = np.clip(np.floor(ref + 0.5), 0, 255)
        assert np.abs(as_uint8 - rounded).max() <= 1, where  # a value at .5 may round either way in float32
        assert np.mean(as_uint8 == rounded) > 0.99, where


def test_draw_strong_respects_the_spec():
    strengths = np.array([0.4, 0.4, 0.2, 0.1])
    only_blur = np.array([F.BLUR], np.int64)
    draws = [F.draw_strong(1.0, strengths, only_blur, 0.1, 2.0) for _ in range(200)]
    for jitter, factors, order, op, sigma in draws:
        assert jitter and op == F.BLUR and 0.1 <= sigma <= 2.0 and sorted(order) == [0, 1, 2, 3]
        assert np.all(factors[:3] >= 1 - strengths[:3]) and np.all(factors[:3] <= 1 + strengths[:3])
        assert abs(factors[3]) <= strengths[3]
    assert len({tuple(d[2]) for d in draws}) > 12  # the order is drawn, not fixed
    never = [F.draw_strong(0.0, strengths, np.array([F.GRAYSCALE, F.SOLARIZE], np.int64), 0.1, 2.0) for _ in range(50)]
    assert not any(d[0] for d in never) and {d[3] for d in never} == {F.GRAYSCALE, F.SOLARIZE}


def test_normalize_view_equals_the_formula():
    src = np.random.default_rng(1).integers(0, 256, (3, 2, 11, 13, 3)).astype(np.uint8)[2, 0]
    expected = np.empty((11, 13, 3), np.float32)
    F.normalize_into(src, expected, SCALE, SHIFT)
    table = F.normalization_table(AugSpec())
    channels_last, planar = np.empty((11, 13, 3), np.float32), np.empty((3, 11, 13), np.float32)
    F.normalize_view(src, channels_last, False, table)
    F.normalize_view(src, planar, True, table)
    np.testing.assert_allclose(channels_last, expected, atol=1e-6)
    np.testing.assert_allclose(planar.transpose(1, 2, 0), expected, atol=1e-6)


@pytest.mark.parametrize("src_shape,window,out_shape", [
    ((60, 75), (0, 60, 0, 75), (41, 52)),  # non-integer factors (the common case of ImageNet-sized photos)
    ((64, 48), (0, 64, 0, 48), (32, 24)),  # exactly 2x (OpenCV's integer fast path)
    ((90, 80), (7, 77, 11, 51), (33, 33)),  # a sub-window (MAE's RandomResizedCrop)
])
def test_area_shrink_matches_opencv(src_shape, window, out_shape):
    """resize_area replaces OpenCV's INTER_AREA (FFCV's resize) on shrinks: same pixels up to rounding."""
    import cv2

    src = np.random.default_rng(2).integers(0, 256, (*src_shape, 3)).astype(np.uint8)
    src[:, : src_shape[1] // 2] = np.linspace(0, 255, src_shape[1] // 2, dtype=np.uint8)[None, :, None]  # smooth too
    top, bottom, left, right = window
    ours = np.empty((*out_shape, 3), np.uint8)
    F.resize_area(src, top, bottom, left, right, ours, np.empty(src_shape[1] * 3, np.float32))
    opencv = cv2.resize(src[top:bottom, left:right], out_shape[::-1], interpolation=cv2.INTER_AREA)
    diff = np.abs(ours.astype(int) - opencv)
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01


@pytest.mark.parametrize("src_shape,out_shape", [
    ((20, 25), (32, 40)),  # both sides grow
    ((40, 20), (32, 32)),  # one shrinks, one grows (MAE's crops)
    ((3, 30), (16, 16)),  # rows narrower than the cubic's four taps grow too
])
def test_resize_area_grows_a_side_with_the_bicubic(src_shape, out_shape):
    """Along a side that grows, resize_area is the bicubic (Keys, a = -0.5) of resize_bicubic_up; along one that
    shrinks, the area filter. Reference: each axis resized on its own, area shrink then bicubic growth. The
    reference rounds and clamps between its passes and resize_area does neither, so the image is smooth (no
    cubic overshoot to clamp; on noise the two differ by up to ~10 levels where the overshoot is clipped):
    at most one level apart."""
    from lut_fast.pipelines.area_resize import resize_area

    (h, w), (big_h, big_w) = src_shape, out_shape
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    src = np.stack([40 + 170 * x, 30 + 180 * y, 128 + 90 * np.sin(3 * x + 2 * y)], axis=2).round().astype(np.uint8)
    ours = np.empty((big_h, big_w, 3), np.uint8)
    resize_area(src, 0, h, 0, w, ours, np.empty(w * 3, np.float32))
    mid_h, mid_w = min(h, big_h), min(w, big_w)  # shrink first
    mid = np.empty((mid_h, mid_w, 3), np.uint8)
    F.resize_area(src, 0, h, 0, w, mid, np.empty(w * 3, np.float32))
    ref = np.empty((big_h, big_w, 3), np.uint8)
    F.resize_bicubic_up(mid, ref, np.empty(mid_h * big_w * 3, np.float32))
    diff = np.abs(ours.astype(int) - ref)
    assert diff.max() <= 1, diff.max()


def test_src_crop_is_a_window_of_the_reflect_padded_image():
    base = np.random.default_rng(3).integers(0, 256, (10, 13, 3)).astype(np.uint8)
    s, pad = 8, 3
    padded = np.pad(base, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    windows = {(t, left): padded[t : t + s, left : left + s] for t in range(10 + 2 * pad - s + 1)
               for left in range(13 + 2 * pad - s + 1)}
    flips = 0
    for _ in range(40):
        out = np.empty((s, s, 3), np.uint8)
        F.src_crop(base, out, pad, 0.5)
        plain = any(np.array_equal(out, w) for w in windows.values())
        flipped = any(np.array_equal(out, w[:, ::-1]) for w in windows.values())
        assert plain or flipped
        flips += flipped and not plain
    assert 5 < flips < 35


def test_strong_view_operation_wiring():
    """StrongView's generated code (called as plain Python) reads its view and writes its own uint8 buffer:
    with no jitter and grayscale only, view 2 is the rounded luma."""
    spec = AugSpec(img_size=12, jitter_p=0.0, strong_ops=("grayscale",))
    images = np.random.default_rng(4).integers(0, 256, (3, 2, 12, 12, 3)).astype(np.uint8)
    out = F.StrongView(spec, 1).generate_code()(images, np.empty((3, 12, 12, 3), np.uint8))
    gray = images[:, 1].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - np.floor(gray + 0.5)[..., None]).max() <= 1


@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_only_batches_are_normalised_as_they_are_copied_out(channels_last):
    """A CPU-only run's views: normalised float32 in the layout asked for, the formula's values, in memory
    of the loader's (reused once let go), read from a strided view of FFCV's (batch, view, S, S, 3) buffer."""
    import torch

    from lut_fast.pipelines.ffcv_backend import _CopyBuffers

    copies, table = _CopyBuffers(keep=2), F.normalization_table(AugSpec())
    ffcv_buffer = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (3, 2, 12, 12, 3)).astype(np.uint8))
    want = ffcv_buffer[:, 1].numpy().astype(np.float32) * SCALE + SHIFT
    out = copies.normalised(1, ffcv_buffer[:, 1], table, planar=not channels_last)
    assert out.dtype == torch.float32 and out.shape == ((3, 12, 12, 3) if channels_last else (3, 3, 12, 12))
    np.testing.assert_allclose(out.numpy() if channels_last else out.numpy().transpose(0, 2, 3, 1), want, atol=1e-5)
    ptr = out.data_ptr()
    assert copies.normalised(1, ffcv_buffer[:, 1], table, not channels_last).data_ptr() != ptr  # still held
    del out
    assert copies.normalised(1, ffcv_buffer[:, 0], table, not channels_last).data_ptr() == ptr  # let go: reused
    assert copies.copy(1, ffcv_buffer[:, 1]).data_ptr() != ptr  # a uint8 copy never lands in a float buffer


def test_batches_copied_out_of_ffcvs_buffers_reuse_memory_only_once_let_go():
    """What FfcvLoader hands out is a copy (FFCV overwrites its buffers a few batches later). The copy's memory
    is reused for a later batch only when no tensor outside the loader shares it any more."""
    import torch

    from lut_fast.pipelines.ffcv_backend import _CopyBuffers

    copies = _CopyBuffers(keep=2)
    src = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).reshape(2, 4, 4, 3)
    held = copies.copy(0, src)
    assert torch.equal(held, src) and held.data_ptr() != src.data_ptr()
    src += 1
    second = copies.copy(0, src)  # the first copy is still held: new memory, the held batch unchanged
    assert second.data_ptr() != held.data_ptr() and torch.equal(held + 1, src) and torch.equal(second, src)
    ptr = second.data_ptr()
    del second
    third = copies.copy(0, src)  # let go: its memory comes back
    assert third.data_ptr() == ptr
    view = third.permute(0, 3, 1, 2)  # a view of it, kept by the consumer, holds the memory too
    del third
    assert copies.copy(0, src).data_ptr() not in (ptr, held.data_ptr())
    del view
    many = [copies.copy(1, src) for _ in range(5)]  # a consumer keeping everything: at most `keep` buffers stay
    assert len(copies.buffers[(1, "copy")]) == 2 and len({t.data_ptr() for t in many}) == 5
