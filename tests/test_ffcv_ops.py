"""FFCV's own numba operations: view 2's operation against the reference ops, the table-driven normalisation
of CPU-only runs against the plain formula, the resize and crop kernels, and the copy buffers."""

from __future__ import annotations

import numpy as np
import pytest

from lut_fast.pipelines import ffcv_ops as F
from lut_fast.pipelines.photometric_numba import normalize_constants_np
from lut_fast.pipelines.spec import AugSpec

SCALE, SHIFT = normalize_constants_np(AugSpec())


def test_normalize_view_equals_the_formula():
    src = np.random.default_rng(1).integers(0, 256, (3, 2, 11, 13, 3)).astype(np.uint8)[2, 0]
    expected = src.astype(np.float32) * SCALE + SHIFT
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


def test_strong_view_operation_is_the_reference_ops_on_its_drawn_parameters():
    """StrongView's generated code (called as plain Python, so its uniforms come from numpy's generator, seeded
    here) reads view ``index`` of the decoder's buffer and writes its own uint8 buffer: the reference ops
    (``photometric.apply_strong_uint8``) with the parameters ``params_from_uniforms`` makes of those uniforms."""
    import torch

    from lut_fast.pipelines import photometric as ph

    spec = AugSpec(img_size=24)
    rng = np.random.default_rng(4)
    coarse = rng.integers(0, 256, (40, 2, 6, 6, 3)).astype(np.float32)  # smooth images with detail
    images = np.clip(coarse.repeat(4, 2).repeat(4, 3) + rng.integers(0, 20, (40, 2, 24, 24, 3)), 0, 255).astype(np.uint8)
    np.random.seed(9)
    out = F.StrongView(spec, 1).generate_code()(images, np.empty((40, 24, 24, 3), np.uint8))
    np.random.seed(9)
    u = np.stack([np.random.random(ph.NUM_UNIFORMS) for _ in range(40)])
    view2 = torch.from_numpy(images[:, 1]).permute(0, 3, 1, 2)
    want = ph.apply_strong_uint8(view2, ph.params_from_uniforms(spec, u), spec).permute(0, 2, 3, 1).numpy()
    diff = np.abs(out.astype(int) - want)
    assert out.dtype == np.uint8 and diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert not np.array_equal(out, images[:, 1]) and not np.array_equal(out, images[:, 0])


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
    both = torch.arange(2 * 2 * 4 * 4 * 3, dtype=torch.uint8).reshape(2, 2, 4, 4, 3)  # the decoder's (B, views, ...)
    first = copies.copy(2, both[:, 1])  # a strided view of FFCV's buffer: copied dense, and its memory reused too
    assert first.is_contiguous() and torch.equal(first, both[:, 1])
    ptr = first.data_ptr()
    del first
    assert copies.copy(2, both[:, 1]).data_ptr() == ptr
