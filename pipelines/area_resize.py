"""Resizing uint8 RGB images in numba: the area (box) filter with OpenCV's INTER_AREA weights where a side
shrinks, bicubic (Keys, a = -0.5, as PIL and torchvision) where it grows; no FFCV or DALI needed.

Both CPU backends that resize on their own use it: FFCV's decoders (``ffcv_ops``) and DALI's CPU graph
(numba operators in ``dali_backend``), for the shorter-side resize of the LUT recipe and for MAE's crops
(FFCV's that shrink, all of DALI's). Shrinking, it is the filter FFCV's own decoders use (OpenCV's
INTER_AREA, an antialiased box filter), several times faster than OpenCV at the non-integer factors that
ImageNet-sized photos need, and about 4x cheaper than DALI's antialiased ``fn.resize`` on the CPU."""

from __future__ import annotations

import numba
import numpy as np

from .numba_cache import jit as _jit  # numba's cache folder is set there


@_jit
def shorter_side_size(h, w, s):
    """(height, width) after resizing the shorter side to s (longer side rounded, never below s)."""
    if h <= w:
        return s, max(s, int(np.floor(w * s / h + 0.5)))
    return max(s, int(np.floor(h * s / w + 0.5))), s


@_jit
def jpeg_scale_denominator(short, target):
    """Largest libjpeg-turbo scale 1/d (d in 8, 4, 2) that keeps the shorter side >= target: how far FFCV's
    decoder (``ffcv_ops.SrcViewsDecoder``) shrinks a JPEG in the DCT domain before the shorter-side resize."""
    for d in (8, 4, 2):
        if (short + d - 1) // d >= target:
            return d
    return 1


@_jit
def _area_taps(n_in, n_out):
    """Per output index: source indices and weights of the area (box) filter shrinking n_in to n_out.

    The weights are each source pixel's share of the output pixel's footprint [o * scale, (o + 1) * scale),
    computed as OpenCV's INTER_AREA computes them (partial pixels below 1e-3 of a pixel dropped), so this
    filter and FFCV's resize (OpenCV's) make the same pixels up to float rounding.
    """
    scale = n_in / n_out
    k = int(np.ceil(scale)) + 1
    index = np.zeros((n_out, k), np.int64)
    weights = np.zeros((n_out, k), np.float32)
    for o in range(n_out):
        lo = o * scale
        hi = lo + scale
        cell = min(scale, n_in - lo)
        first = min(int(np.ceil(lo)), n_in - 1)
        last = min(int(np.floor(hi)), n_in - 1)
        first = min(first, last)
        t = 0
        if first - lo > 1e-3:
            index[o, t], weights[o, t] = first - 1, (first - lo) / cell
            t += 1
        for i in range(first, last):
            index[o, t], weights[o, t] = i, 1.0 / cell
            t += 1
        if hi - last > 1e-3:
            index[o, t], weights[o, t] = last, min(min(hi - last, 1.0), cell) / cell
            t += 1
        for u in range(t, k):  # unused taps: weight 0 on a valid index
            index[o, u] = index[o, 0]
    return index, weights


@_jit
def _cubic(x):
    """Keys' cubic with a = -0.5, PIL's and torchvision's bicubic kernel."""
    x = abs(x)
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1.0
    if x < 2.0:
        return ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return 0.0


@_jit
def cubic_taps(n_in, n_out):
    """Per output index: the first of 4 source taps and their weights (taps outside the image dropped)."""
    first = np.empty(n_out, np.int64)
    weights = np.zeros((n_out, 4), np.float32)
    for o in range(n_out):
        center = (o + 0.5) * n_in / n_out - 0.5
        first[o] = int(np.floor(center)) - 1
        total = 0.0
        for t in range(4):
            i = first[o] + t
            if 0 <= i < n_in:
                weights[o, t] = _cubic(i - center)
                total += weights[o, t]
        weights[o] /= total
    return first, weights


@_jit
def _axis_taps(n_in, n_out):
    """Source indices and weights per output index along one axis: ``_area_taps`` where the axis shrinks (or
    keeps its size), ``cubic_taps`` where it grows (taps outside the image get weight 0 on a valid index)."""
    if n_out <= n_in:
        return _area_taps(n_in, n_out)
    first, weights = cubic_taps(n_in, n_out)
    index = np.empty((n_out, 4), np.int64)
    for o in range(n_out):
        for t in range(4):
            index[o, t] = min(max(first[o] + t, 0), n_in - 1)  # weight 0 where clamped
    return index, weights


@_jit
def _column_taps(n_in, n_out):
    """``_axis_taps`` across a row, in the form the horizontal pass reads: per output pixel the flat offset
    (3 values per pixel) of its first source pixel and the weights of consecutive source pixels from there.

    Both filters' taps are consecutive; the unused ones (weight 0) lead (cubic, at the left edge) or trail.
    The window is moved to start at the first used tap and, where it would then run past the row's end,
    that many pixels earlier with as many leading zero weights: adding an exact zero first changes no sum,
    and every read stays inside the row.
    """
    index, weights = _axis_taps(n_in, n_out)
    k = index.shape[1]
    if n_in < k:  # a row narrower than the filter (a crop of a few pixels enlarged): the whole row is the window
        start = np.zeros(n_out, np.uint64)
        taps = np.zeros((n_out, n_in), np.float32)
        for x in range(n_out):
            for t in range(k):
                taps[x, index[x, t]] += weights[x, t]
        return start, taps
    start = np.empty(n_out, np.uint64)
    taps = np.zeros((n_out, k), np.float32)
    for x in range(n_out):
        lead = 0
        while lead < k - 1 and weights[x, lead] == 0.0:
            lead += 1
        first = index[x, lead]
        shift = min(max(first + k - n_in, 0), first)  # never before the row's start
        start[x] = 3 * (first - shift)
        for t in range(lead, k):
            if weights[x, t] != 0.0 and t - lead + shift < k:
                taps[x, t - lead + shift] = weights[x, t]
    return start, taps


@numba.njit(inline="always")
def _store(out, x, clamp, v0, v1, v2):
    """Pixel x of an output row, rounded: values + 0.5 truncated, which is the floor where they are >= 0.

    Area weights are positive and sum to 1, so the values are in [0, 255] already; the bicubic's lobes
    overshoot, so where an axis grows they are clamped to [0, 255.5) first. (Inlined into the caller's
    loops: its branch on ``clamp`` is then hoisted out of them, which the clamp-free loop needs to run
    a quarter faster.)"""
    half = np.float32(0.5)
    if clamp:
        zero, top_level = np.float32(0.0), np.float32(255.0)
        v0, v1, v2 = min(max(v0 + half, zero), top_level), min(max(v1 + half, zero), top_level), min(max(v2 + half, zero), top_level)
    else:
        v0, v1, v2 = v0 + half, v1 + half, v2 + half
    out[x, 0] = np.uint8(v0)
    out[x, 1] = np.uint8(v1)
    out[x, 2] = np.uint8(v2)


@_jit
def resize_area(src, top, bottom, left, right, dst, acc):
    """Resize of uint8 ``src[top:bottom, left:right]`` (h, w, 3) into dst (H, W, 3) (the arguments of FFCV's
    ``resize_crop``): the area (box) filter along an axis that shrinks, bicubic along one that grows (a crop
    enlarged along one side and shrunk along the other gets both); ``acc``: >= w*3 floats.

    Separable: each output row is first the weighted sum of its source rows (one contiguous multiply-add
    per tap over the whole row, which numba vectorises), then the few taps across. About three times
    faster than OpenCV's INTER_AREA at the non-integer factors that ImageNet-sized photos need (OpenCV
    has a fast path for integer factors only), with the same weights (``_area_taps``).

    Across, three and four source pixels per output pixel (any shrink by up to 3) are written out tap by
    tap: the general loop, with its per-tap index and weight loads, took three quarters of the whole
    resize. Offsets are unsigned so that no access carries a negative-index check; the sums are the
    loop's, in its order, so the pixels are the same. (The pass stays in this function, its one helper
    inlined: FFCV's stage code passes ``dst`` typed read-only where its branches join, and a separate
    kernel for the pass broke numba's dispatch on that type, KeyError in ``nopython_signatures``.)
    """
    h, w, big_h, big_w = bottom - top, right - left, dst.shape[0], dst.shape[1]
    full = 3 * src.shape[1]
    rows_i, rows_w = _axis_taps(h, big_h)
    start, taps = _column_taps(w, big_w)
    k = taps.shape[1]
    n = 3 * w
    row = acc[:n]
    grows = big_h > h or big_w > w  # only the bicubic's values can leave [0, 255]
    one, two = np.uint64(1), np.uint64(2)
    for o in range(big_h):
        for e in range(n):
            row[e] = 0.0
        for t in range(rows_i.shape[1]):
            wt = rows_w[o, t]
            if wt == 0.0:
                continue
            line = src[top + rows_i[o, t]].reshape(full)[3 * left : 3 * right]  # 1-d C slices: vectorised
            for e in range(n):
                row[e] += wt * line[e]
        out = dst[o]
        if k == 3:
            for x in range(big_w):
                s = start[x]
                w0, w1, w2 = taps[x, 0], taps[x, 1], taps[x, 2]
                a, b = s + np.uint64(3), s + np.uint64(6)
                _store(out, x, grows,
                       w0 * row[s] + w1 * row[a] + w2 * row[b],
                       w0 * row[s + one] + w1 * row[a + one] + w2 * row[b + one],
                       w0 * row[s + two] + w1 * row[a + two] + w2 * row[b + two])
        elif k == 4:
            for x in range(big_w):
                s = start[x]
                w0, w1, w2, w3 = taps[x, 0], taps[x, 1], taps[x, 2], taps[x, 3]
                a, b, c = s + np.uint64(3), s + np.uint64(6), s + np.uint64(9)
                _store(out, x, grows,
                       w0 * row[s] + w1 * row[a] + w2 * row[b] + w3 * row[c],
                       w0 * row[s + one] + w1 * row[a + one] + w2 * row[b + one] + w3 * row[c + one],
                       w0 * row[s + two] + w1 * row[a + two] + w2 * row[b + two] + w3 * row[c + two])
        else:
            for x in range(big_w):
                s = start[x]
                v0 = v1 = v2 = np.float32(0.0)
                for t in range(k):
                    wt, i = taps[x, t], s + np.uint64(3 * t)
                    v0 += wt * row[i]
                    v1 += wt * row[i + one]
                    v2 += wt * row[i + two]
                _store(out, x, grows, v0, v1, v2)
