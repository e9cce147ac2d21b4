"""FFCV pipeline operations (numba) that implement ``AugSpec``'s LUT views.

Graph for the LUT recipe (built in ``ffcv_backend.py``)::

    SrcViewsDecoder --(B, 2, S, S, 3)--+-- TakeView(0) ----------------> view 1
      decode once, resize shorter      |
      side to S once, two SRC crops    +-- StrongView(1) --------------> view 2
                                           jitter (p), 1 of 3 ops

and for the MAE recipe a single ``RrcFlipDecoder`` (RandomResizedCrop + flip).
Every operation writes uint8. For CPU-only training the loader normalises
both views as it copies them out of FFCV's buffers (``normalize_views``, a
table look-up into memory it reuses; ``ffcv_backend._CopyBuffers``): the copy
has to be made anyway, and float32 written by the kernels (4x the bytes, in
buffers FFCV allocates anew every epoch) was then copied again. With
``photometric_on=device`` the graph ends at the decoder: both uint8 crops go
to the trainer, view 2's ops run batched on the device. Images stored with
their shorter side at S already (``convert --shorter-side S``) skip the resize.

Why custom operations: FFCV's own RandomBrightness/Contrast/Saturation
modify their input in place, so with one decode shared by two views they
would change view 1 too, and FFCV has no SRC crop, hue, grayscale, solarize
or blur. Every operation here reads its input and writes only buffers it
declared itself (``AllocationQuery``); ``TakeView`` writes nothing at all
(it returns a strided view of the decoder's output, which no one modifies).

Semantics follow ``photometric.py`` (the torch reference) with the same
factors and the same YIQ-rotation hue (linear, as DALI's ``fn.hsv``); the
kernels apply the four jitter ops one by one in a random order, clamping
after each (torchvision's rule; the reference composes them and clamps
once). View 2 runs as one fused kernel (``strong_view_fused``: row by row,
every pointwise op in one pass, the blur through a ring of rows), tested
against the composition of the one-op kernels, which are tested against
the torch ops. ITU-R 601 luma, solarize at ``threshold`` on 0..255, a separable
Gaussian of 2*ceil(3 sigma)+1 taps per image (at most
``spec.blur_kernel_size``) with reflect padding. Pixels are
floats on the 0..255 scale inside the kernels.

The one deviation: shrinking to the shorter side S uses an area filter
(what FFCV's own decoders use, through OpenCV's INTER_AREA: an antialiased
box filter) rather than bicubic, computed here with OpenCV's weights
(``area_resize.resize_area``, shared with DALI's CPU graph, several times faster than OpenCV at non-integer
factors); enlarging (images stored below S) is bicubic, in numba here. JPEGs much larger than S are
decoded at 1/2, 1/4 or 1/8 scale by libjpeg-turbo first (the scaled
shorter side stays >= S).

Random numbers come from numba's per-thread generators: order is seeded by
FFCV, augmentation pixels are not reproducible run to run (as in FFCV).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numba
import numpy as np
import torch

_torch_threads = torch.get_num_threads()  # importing FFCV sets torch's process-wide thread count to 1
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402

torch.set_num_threads(_torch_threads)

from .area_resize import cubic_taps, resize_area, shorter_side_size  # noqa: E402  (numba cache folder set there, before the kernels below)
from .src_windows import mirror_rows, reflect, window_hwc  # noqa: E402
from .spec import STRONG_OPS, AugSpec  # noqa: E402

# Small kernels called from FFCV's generated code, cached on disk (numba_cache), so a new Loader
# compiles only FFCV's own generated stage functions, which numba cannot cache (they are closures).
from .numba_cache import jit as _jit  # noqa: E402
# FFCV's ctypes wrappers, compiled once here rather than once per Loader: a per-Loader copy
# is garbage collected with its Loader, and numba's finaliser then prints a KeyError.
_imdecode = numba.njit(nogil=True)(imdecode)
_resize_crop = numba.njit(nogil=True)(resize_crop)
_U8 = np.dtype("u1")
_F4 = np.dtype("f4")
GRAYSCALE, SOLARIZE, BLUR = (STRONG_OPS.index(op) for op in ("grayscale", "solarize", "blur"))


# ---------------------------------------------------------------- geometry (SRC)


@_jit
def jpeg_scale_denominator(short, target):
    """Largest libjpeg-turbo scale 1/d (d in 8, 4, 2) that keeps the shorter side >= target."""
    for d in (8, 4, 2):
        if (short + d - 1) // d >= target:
            return d
    return 1


@_jit
def resize_bicubic_up(src, dst, tmp):
    """Bicubic enlargement of src (h, w, 3) into dst (H, W, 3), H >= h, W >= w; ``tmp`` holds >= h*W*3 floats.

    OpenCV's INTER_AREA (FFCV's resize) enlarges almost like nearest neighbour,
    which shows as blocks on images stored below S, so enlargements come here.
    """
    h, w, big_h, big_w = src.shape[0], src.shape[1], dst.shape[0], dst.shape[1]
    rows = tmp[: h * big_w * 3].reshape(h, big_w, 3)
    first, wts = cubic_taps(w, big_w)
    for y in range(h):
        for o in range(big_w):
            for c in range(3):
                acc = 0.0
                for t in range(4):
                    i = first[o] + t
                    if 0 <= i < w:
                        acc += wts[o, t] * src[y, i, c]
                rows[y, o, c] = min(max(np.floor(acc + 0.5), 0.0), 255.0)  # 8-bit between passes, as PIL
    first, wts = cubic_taps(h, big_h)
    for o in range(big_h):
        for x in range(big_w):
            for c in range(3):
                acc = 0.0
                for t in range(4):
                    i = first[o] + t
                    if 0 <= i < h:
                        acc += wts[o, t] * rows[i, x, c]
                dst[o, x, c] = np.uint8(min(max(np.floor(acc + 0.5), 0.0), 255.0))


@_jit
def rrc_box(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi):
    """torchvision's RandomResizedCrop box (top, left, h, w): 10 tries, then a central crop."""
    area = height * width
    for _ in range(10):
        target = area * np.random.uniform(scale_lo, scale_hi)
        ratio = math.exp(np.random.uniform(log_ratio_lo, log_ratio_hi))
        w = int(np.floor(math.sqrt(target * ratio) + 0.5))
        h = int(np.floor(math.sqrt(target / ratio) + 0.5))
        if 0 < w <= width and 0 < h <= height:
            return np.random.randint(0, height - h + 1), np.random.randint(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < math.exp(log_ratio_lo):
        w, h = width, int(np.floor(width / math.exp(log_ratio_lo) + 0.5))
    elif in_ratio > math.exp(log_ratio_hi):
        h, w = height, int(np.floor(height * math.exp(log_ratio_hi) + 0.5))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@_jit
def src_crop(base, out, pad, flip_p):
    """One SRC view (``src_windows.window_hwc``) of the HWC image ``base`` into ``out`` (S, S, 3), at an
    offset and a flip drawn from numba's generator, which FFCV seeds per batch."""
    h, w, s = base.shape[0], base.shape[1], out.shape[0]
    top = np.random.randint(0, h + 2 * pad - s + 1)
    left = np.random.randint(0, w + 2 * pad - s + 1)
    flip = np.random.random() < flip_p
    window_hwc(out.reshape(s * s * 3), base.reshape(h * w * 3), h, w, s, pad, top, left, flip)


# ---------------------------------------------------------------- photometric (view 2), one op per kernel
# In place on a float (h, w, 3) image on 0..255: the reference that the fused kernel below is tested
# against (and that is tested against photometric.py's torch ops).


@_jit
def _clip(v):
    return min(max(v, 0.0), 255.0)


@_jit
def _brightness(x, f):
    for y in range(x.shape[0]):
        for i in range(x.shape[1]):
            for c in range(3):
                x[y, i, c] = _clip(x[y, i, c] * f)


@_jit
def _contrast(x, f):
    m = 0.0
    for y in range(x.shape[0]):
        for i in range(x.shape[1]):
            m += 0.299 * x[y, i, 0] + 0.587 * x[y, i, 1] + 0.114 * x[y, i, 2]
    m /= x.shape[0] * x.shape[1]
    for y in range(x.shape[0]):
        for i in range(x.shape[1]):
            for c in range(3):
                x[y, i, c] = _clip(f * x[y, i, c] + (1.0 - f) * m)


@_jit
def _saturation(x, f):
    for y in range(x.shape[0]):
        for i in range(x.shape[1]):
            g = 0.299 * x[y, i, 0] + 0.587 * x[y, i, 1] + 0.114 * x[y, i, 2]
            for c in range(3):
                x[y, i, c] = _clip(f * x[y, i, c] + (1.0 - f) * g)


# NTSC YIQ: Y is ITU-R 601 luma; hue turns the (I, Q) chroma plane about the gray axis.
_RGB_TO_YIQ = np.array(((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)))
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


@_jit
def hue_matrix(shift):
    """3x3 RGB -> RGB map rotating YIQ's chroma plane by ``shift`` turns (positive: red towards green)."""
    c, s = math.cos(2.0 * math.pi * shift), math.sin(2.0 * math.pi * shift)
    rot = np.array(((1.0, 0.0, 0.0), (0.0, c, s), (0.0, -s, c)))
    return _YIQ_TO_RGB @ (rot @ _RGB_TO_YIQ)


@_jit
def _hue(x, shift):
    """Hue shift as a linear map about the gray axis (luma kept), as the torch reference and DALI's fn.hsv
    do: a 3x3 multiply per pixel instead of an HSV round trip."""
    m = hue_matrix(shift).astype(np.float32)
    for y in range(x.shape[0]):
        for i in range(x.shape[1]):
            r, g, b = x[y, i, 0], x[y, i, 1], x[y, i, 2]
            for c in range(3):
                x[y, i, c] = _clip(m[c, 0] * r + m[c, 1] * g + m[c, 2] * b)


@_jit
def _grayscale(x):
    for y in range(x.shape[0]):
        for i in range(x.shape[1]):
            g = 0.299 * x[y, i, 0] + 0.587 * x[y, i, 1] + 0.114 * x[y, i, 2]
            x[y, i, 0] = g
            x[y, i, 1] = g
            x[y, i, 2] = g


@_jit
def _solarize(x, threshold):
    flat = x.reshape(-1)
    for e in range(flat.size):
        v = flat[e]
        flat[e] = 255.0 - v if v >= threshold - 0.5 else v  # a select, so the loop vectorises


@_jit
def _blur(x, tmp, sigma, half):
    """Separable Gaussian, 2*half+1 normalised taps, reflect padding; ``tmp`` is scratch.

    Rows are flattened (w * 3 values) so the interior of each pass is a
    contiguous multiply-add that vectorises; only the half-wide borders
    use reflected indices.
    """
    k = gaussian_taps(sigma, half)
    h, w = x.shape[0], x.shape[1]
    xf, tf = x.reshape(h, w * 3), tmp.reshape(h, w * 3)
    inner = 3 * (w - 2 * half)
    for y in range(h):  # horizontal: x -> tmp
        row, out = xf[y], tf[y]
        out[:] = 0.0
        for j in range(2 * half + 1):
            kj = k[j]
            for e in range(inner):
                out[3 * half + e] += kj * row[3 * j + e]
        for i in list(range(half)) + list(range(w - half, w)):
            for c in range(3):
                acc = 0.0
                for j in range(2 * half + 1):
                    acc += k[j] * row[3 * reflect(i + j - half, w) + c]
                out[3 * i + c] = acc
    for y in range(h):  # vertical: tmp -> x
        out = xf[y]
        out[:] = 0.0
        for j in range(2 * half + 1):
            kj, src = k[j], tf[reflect(y + j - half, h)]
            for e in range(3 * w):
                out[e] += kj * src[e]


@_jit
def _to_float(src, x):
    for y in range(src.shape[0]):
        for i in range(src.shape[1]):
            for c in range(3):
                x[y, i, c] = src[y, i, c]


@_jit
def normalize_into(src, dst, scale, shift):
    """dst[y, x, c] = src[y, x, c] * scale[c] + shift[c]: (v - 255 mean) / (255 std) for src on 0..255.

    ``dst`` may be a transposed view of a (3, h, w) buffer, so one kernel writes either memory layout.
    """
    s0, s1, s2, b0, b1, b2 = scale[0], scale[1], scale[2], shift[0], shift[1], shift[2]
    for y in range(src.shape[0]):
        for i in range(src.shape[1]):
            dst[y, i, 0] = src[y, i, 0] * s0 + b0
            dst[y, i, 1] = src[y, i, 1] * s1 + b1
            dst[y, i, 2] = src[y, i, 2] * s2 + b2


# ---------------------------------------------------------------- view 2, fused


# The fused kernels below work on one image row at a time, de-interleaved into three float32 rows (r, g, b)
# that stay in L1 cache: every op is then a contiguous loop that numba vectorises, where the one-op kernels
# above make one pass over the whole float image per op with the channel loop inside. Constants are float32
# (a float64 constant would turn the loops into float64 arithmetic). The one-op kernels stay the reference
# (tests check the fused kernel against their composition, and them against the torch ops).
_LUMA = np.array((0.299, 0.587, 0.114), np.float32)


@_jit
def _load_row(src, y, r, g, b):
    """Row y of uint8 (h, w, 3) ``src`` as float32 planes (uint8 -> float folded into the first pass)."""
    for i in range(r.size):
        r[i] = src[y, i, 0]
        g[i] = src[y, i, 1]
        b[i] = src[y, i, 2]


@_jit
def _jitter_rows(r, g, b, order, n_ops, factors, hue_m, mean):
    """ColorJitter ops ``order[:n_ops]`` (0 brightness, 1 contrast, 2 saturation, 3 hue) on one row, clamping
    after each (torchvision's rule); ``mean``: the mean luma of contrast's input image."""
    zero, top = np.float32(0.0), np.float32(255.0)
    wr, wg, wb = _LUMA[0], _LUMA[1], _LUMA[2]
    for k in range(n_ops):
        j = order[k]
        if j == 0:
            f = factors[0]
            for i in range(r.size):
                r[i] = min(max(r[i] * f, zero), top)
                g[i] = min(max(g[i] * f, zero), top)
                b[i] = min(max(b[i] * f, zero), top)
        elif j == 1:
            f = factors[1]
            off = (np.float32(1.0) - f) * mean
            for i in range(r.size):
                r[i] = min(max(f * r[i] + off, zero), top)
                g[i] = min(max(f * g[i] + off, zero), top)
                b[i] = min(max(f * b[i] + off, zero), top)
        elif j == 2:
            f = factors[2]
            f1 = np.float32(1.0) - f
            for i in range(r.size):
                gray = f1 * (wr * r[i] + wg * g[i] + wb * b[i])
                r[i] = min(max(f * r[i] + gray, zero), top)
                g[i] = min(max(f * g[i] + gray, zero), top)
                b[i] = min(max(f * b[i] + gray, zero), top)
        else:
            m00, m01, m02 = hue_m[0, 0], hue_m[0, 1], hue_m[0, 2]
            m10, m11, m12 = hue_m[1, 0], hue_m[1, 1], hue_m[1, 2]
            m20, m21, m22 = hue_m[2, 0], hue_m[2, 1], hue_m[2, 2]
            for i in range(r.size):
                rv, gv, bv = r[i], g[i], b[i]
                r[i] = min(max(m00 * rv + m01 * gv + m02 * bv, zero), top)
                g[i] = min(max(m10 * rv + m11 * gv + m12 * bv, zero), top)
                b[i] = min(max(m20 * rv + m21 * gv + m22 * bv, zero), top)


@_jit
def _point_op_rows(r, g, b, op, threshold):
    """The 3-augment op when it is pointwise (grayscale, solarize) on one row; blur is done by the caller."""
    if op == GRAYSCALE:
        wr, wg, wb = _LUMA[0], _LUMA[1], _LUMA[2]
        for i in range(r.size):
            v = wr * r[i] + wg * g[i] + wb * b[i]
            r[i] = v
            g[i] = v
            b[i] = v
    elif op == SOLARIZE:
        t, top = np.float32(threshold - 0.5), np.float32(255.0)
        for i in range(r.size):
            r[i] = top - r[i] if r[i] >= t else r[i]
            g[i] = top - g[i] if g[i] >= t else g[i]
            b[i] = top - b[i] if b[i] >= t else b[i]


@_jit
def _emit_row(dst, y, r, g, b):
    """Row y of the result into uint8 (h, w, 3) ``dst``, rounded to nearest."""
    half, zero, top = np.float32(0.5), np.float32(0.0), np.float32(255.0)
    for i in range(r.size):  # clamped first, then truncated: floor(v + 0.5) on 0..255, without a call to floor
        dst[y, i, 0] = np.uint8(min(max(r[i] + half, zero), top))
        dst[y, i, 1] = np.uint8(min(max(g[i] + half, zero), top))
        dst[y, i, 2] = np.uint8(min(max(b[i] + half, zero), top))


@_jit
def gaussian_taps(sigma, half):
    """2*half+1 normalised Gaussian weights: exp(-d^2 / (2 sigma^2)) for d in -half..half, summing to 1."""
    k = np.empty(2 * half + 1, np.float32)
    for j in range(2 * half + 1):
        k[j] = np.exp(-((j - half) ** 2) / (2.0 * sigma * sigma))
    k /= k.sum()
    return k


@_jit
def normalize_views(src, dst, planar, table):
    """``normalize_view`` of each view of a uint8 batch (n, h, w, 3) into float32 ``dst`` ((n, 3, h, w) if
    ``planar``, else (n, h, w, 3)): how the CPU-only loader copies a batch out of FFCV's buffers."""
    for i in range(src.shape[0]):
        normalize_view(src[i], dst[i], planar, table)


@_jit
def normalize_view(src, dst, planar, table):
    """uint8 (h, w, 3) ``src`` normalised into float32 ``dst`` ((3, h, w) if ``planar``, else (h, w, 3)) by table
    look-up: ``table[c, v]`` holds ``normalize_into``'s value for v (``normalization_table``), which saves the
    uint8 -> float conversion and the multiply-add per value (about 40 % of the pass)."""
    t0, t1, t2 = table[0], table[1], table[2]
    for y in range(src.shape[0]):
        if planar:
            d0, d1, d2 = dst[0, y], dst[1, y], dst[2, y]
            for i in range(src.shape[1]):
                d0[i] = t0[src[y, i, 0]]
                d1[i] = t1[src[y, i, 1]]
                d2[i] = t2[src[y, i, 2]]
        else:
            for i in range(src.shape[1]):
                dst[y, i, 0] = t0[src[y, i, 0]]
                dst[y, i, 1] = t1[src[y, i, 1]]
                dst[y, i, 2] = t2[src[y, i, 2]]


@_jit
def draw_strong(jitter_p, strengths, ops, sigma_lo, sigma_hi):
    """View 2's random choices, in the order they are drawn: (jitter applied, factors, op order, op, sigma)."""
    factors = np.zeros(4)  # no jitter: unused (and the hue matrix of 0 the identity)
    order = np.arange(4)
    jitter = np.random.random() < jitter_p
    if jitter:
        for j in range(3):
            factors[j] = np.random.uniform(max(0.0, 1.0 - strengths[j]), 1.0 + strengths[j])
        factors[3] = np.random.uniform(-strengths[3], strengths[3])
        order = np.random.permutation(4)
    op = ops[np.random.randint(0, len(ops))]
    sigma = np.random.uniform(sigma_lo, sigma_hi) if op == BLUR else 0.0
    return jitter, factors, order, op, sigma


@_jit
def strong_view_fused(src, dst, jitter, factors, order, op, sigma, threshold, max_half):
    """View 2 of uint8 (h, w, 3) ``src`` with the given choices (see ``draw_strong``) into uint8 ``dst`` (``_emit_row``).

    Two passes over ``src``, row by row, nothing but rows stored in between: the first finds contrast's
    mean luma (uint8 -> float and the jitter ops before contrast; skipped without jitter), the second
    applies every jitter op and the 3-augment op and writes ``dst``. Blur rides on the second pass:
    each finished row is blurred horizontally into a ring of the last 2*half+1 rows, and each output
    row is the vertical sum over that ring, so the image never goes through memory as floats. Same
    result as ``_to_float``, the one-op kernels in ``order`` and rounding one after the other, up to
    float32 rounding.
    """
    h, w = src.shape[0], src.shape[1]
    rows = np.empty((3, w), np.float32)
    r, g, b = rows[0], rows[1], rows[2]
    n_ops = 4 if jitter else 0
    f32 = factors.astype(np.float32)
    hue_m = hue_matrix(factors[3]).astype(np.float32)
    mean = np.float32(0.0)
    if jitter:
        before = 0
        while order[before] != 1:
            before += 1
        wr, wg, wb = _LUMA[0], _LUMA[1], _LUMA[2]
        total = 0.0
        for y in range(h):
            _load_row(src, y, r, g, b)
            _jitter_rows(r, g, b, order, before, f32, hue_m, mean)
            row_sum = np.float32(0.0)
            for i in range(w):
                row_sum += wr * r[i] + wg * g[i] + wb * b[i]
            total += row_sum
        mean = np.float32(total / (h * w))
    blur = op == BLUR
    half = min(max_half, int(np.ceil(3.0 * sigma)), (min(h, w) - 1) // 2) if blur else 0
    taps = 2 * half + 1
    k = gaussian_taps(sigma, half) if blur else np.ones(1, np.float32)
    ring = np.empty((3 * taps, w), np.float32)  # horizontally blurred rows; row y's plane c at 3 * (y % taps) + c
    padded = np.empty(w + 2 * half, np.float32)
    out = np.empty((3, w), np.float32)
    for y in range(h):
        _load_row(src, y, r, g, b)
        _jitter_rows(r, g, b, order, n_ops, f32, hue_m, mean)
        if not blur:
            _point_op_rows(r, g, b, op, threshold)
            _emit_row(dst, y, r, g, b)
            continue
        slot = 3 * (y % taps)
        for c in range(3):  # horizontal, each row reflect-padded once so the taps need no index tricks
            row = rows[c]
            for i in range(w):
                padded[half + i] = row[i]
            for i in range(half):
                padded[half - 1 - i] = row[i + 1]
                padded[half + w + i] = row[w - 2 - i]
            _convolve_row(ring[slot + c], padded, k)
        if y >= half:  # every row output y - half reads (reflected) is in the ring now
            _vertical_into(dst, y - half, ring, k, h, out)
    if blur:
        for y in range(h - half, h):
            _vertical_into(dst, y, ring, k, h, out)


@_jit
def _vertical_into(dst, y, ring, k, h, out):
    """Output row y of the blur: sum over taps j of k[j] * ring row reflect(y + j - half), into ``dst``."""
    taps = k.size
    half = taps // 2
    r, g, b = out[0], out[1], out[2]
    for i in range(r.size):
        r[i] = 0.0
        g[i] = 0.0
        b[i] = 0.0
    for j in range(taps):
        kj, slot = k[j], 3 * (reflect(y + j - half, h) % taps)
        _add_scaled(r, kj, ring[slot])
        _add_scaled(g, kj, ring[slot + 1])
        _add_scaled(b, kj, ring[slot + 2])
    _emit_row(dst, y, r, g, b)


@_jit
def _convolve_row(out, padded, k):
    """out[i] = sum_j k[j] * padded[i + j], tap by tap: contiguous multiply-adds that numba vectorises
    (indices built from loop counters only, which numba can prove non-negative)."""
    for i in range(out.size):
        out[i] = 0.0
    for j in range(k.size):
        kj = k[j]
        for i in range(out.size):
            out[i] += kj * padded[i + j]


@_jit
def _add_scaled(acc, weight, row):
    for i in range(acc.size):
        acc[i] += weight * row[i]


@_jit
def strong_view_draw(src, dst, jitter_p, strengths, ops, threshold, sigma_lo, sigma_hi, max_half):
    """View 2 of uint8 ``src`` into uint8 ``dst``, choices drawn here."""
    jitter, factors, order, op, sigma = draw_strong(jitter_p, strengths, ops, sigma_lo, sigma_hi)
    strong_view_fused(src, dst, jitter, factors, order, op, sigma, threshold, max_half)


def normalization(spec: AugSpec) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel for pixels on 0..255 (the same map as ``batch.finish_batch``)."""
    scale = np.array([1.0 / (255.0 * sd) for sd in spec.std], np.float32)
    shift = np.array([-m / sd for m, sd in zip(spec.mean, spec.std)], np.float32)
    return scale, shift


def normalization_table(spec: AugSpec) -> np.ndarray:
    """(3, 256) float32: row c holds channel c's normalised value of each uint8 (``normalize_view``)."""
    scale, shift = normalization(spec)
    return np.arange(256, dtype=np.float32)[None] * scale[:, None] + shift[:, None]


# ---------------------------------------------------------------- FFCV operations


class SrcViewsDecoder(SimpleRGBImageDecoder):
    """Decode once, resize the shorter side to S once, cut ``views`` independent SRC crops.

    Output per sample: (views, S, S, 3) uint8. Subclassing FFCV's image
    decoder lets ``PipelineSpec`` recognise it as the field's decoder.
    """

    def __init__(self, spec: AugSpec, views: int):
        super().__init__()
        self.spec, self.views = spec, views

    def declare_state_and_memory(self, previous_state):
        s = self.spec.img_size
        h = self.metadata["height"].astype(np.int64)
        w = self.metadata["width"].astype(np.int64)
        longest_resized = int(max(s, np.floor(np.maximum(h, w) * s / np.maximum(np.minimum(h, w), 1) + 0.5).max()))
        out = (self.views, s, s, 3)
        return (
            replace(previous_state, jit_mode=True, shape=out, dtype=_U8),
            (
                AllocationQuery(out, _U8),
                AllocationQuery((int((h * w).max()) * 3,), _U8),  # full decode
                AllocationQuery((s * longest_resized * 3,), _U8),  # shorter side at S
                # scratch of the bicubic enlargement, and one float row of the area shrink
                AllocationQuery((max(s * longest_resized, int(w.max())) * 3,), _F4),
            ),
        )

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, resize_c = _imdecode, _resize_crop
        jpg = IMAGE_MODES["jpg"]
        s, pad, flip_p, views = self.spec.img_size, self.spec.src_padding, self.spec.flip_p, self.views

        def decode(batch_indices, my_storage, metadata, storage_state):
            dst, decoded, resized, scratch = my_storage
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = mem_read(field["data_ptr"], storage_state)
                h, w = np.int64(field["height"]), np.int64(field["width"])
                if field["mode"] == jpg:
                    d = jpeg_scale_denominator(min(h, w), s)
                    hd, wd = (h + d - 1) // d, (w + d - 1) // d
                    img = decoded[i][: hd * wd * 3].reshape(hd, wd, 3)
                    imdecode_c(data, img, np.uint32(h), np.uint32(w), np.uint32(h), np.uint32(w), 0, 0, 1, np.uint32(d),
                               False, False)
                else:
                    hd, wd = h, w
                    img = data.reshape(h, w, 3)
                nh, nw = shorter_side_size(h, w, s)
                if hd == nh and wd == nw:  # stored at the training size (convert --shorter-side S): no resize
                    base = img
                else:
                    base = resized[i][: nh * nw * 3].reshape(nh, nw, 3)
                    if min(hd, wd) < s:
                        resize_bicubic_up(img, base, scratch[i])
                    elif hd >= nh and wd >= nw:
                        resize_area(img, 0, hd, 0, wd, base, scratch[i])
                    else:  # one side a pixel short of its target through rounding
                        resize_c(img, 0, hd, 0, wd, base)
                for v in range(views):
                    src_crop(base, dst[i, v], pad, flip_p)
            return dst[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class TakeView(Operation):
    """View ``index`` of a multi-view batch, as a strided view: no copy, no write."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True, shape=previous_state.shape[1:]), None

    def generate_code(self):
        index = self.index

        def take(images, _):
            return images[:, index]

        return take


class StrongView(Operation):
    """View 2's photometric ops on view ``index``, uint8 into this operation's own buffer (``strong_view_fused``)."""

    def __init__(self, spec: AugSpec, index: int):
        super().__init__()
        self.spec, self.index = spec, index

    def declare_state_and_memory(self, previous_state):
        shape = previous_state.shape[1:]
        return replace(previous_state, jit_mode=True, shape=shape, dtype=_U8), AllocationQuery(shape, _U8)

    def generate_code(self):
        sp = self.spec
        my_range = Compiler.get_iterator()
        index = self.index
        strengths = np.array([sp.brightness, sp.contrast, sp.saturation, sp.hue], np.float64)
        ops = np.array([STRONG_OPS.index(op) for op in sp.strong_ops], np.int64)
        jitter_p, threshold = float(sp.jitter_p), float(sp.solarize_threshold)
        sigma_lo, sigma_hi, half = float(sp.blur_sigma[0]), float(sp.blur_sigma[1]), sp.blur_kernel_size // 2

        def strong(images, dst):
            n = images.shape[0]
            for i in my_range(n):
                strong_view_draw(images[i, index], dst[i], jitter_p, strengths, ops, threshold, sigma_lo, sigma_hi,
                                 half)
            return dst[:n]

        strong.is_parallel = True
        return strong


class RrcFlipDecoder(SimpleRGBImageDecoder):
    """MAE view: decode, RandomResizedCrop (``spec.rrc_scale``/``rrc_ratio``) to S x S, flip with ``spec.flip_p``.

    Replaces FFCV's RandomResizedCropRGBImageDecoder + RandomHorizontalFlip:
    same box rule, but one operation built from cached kernels (FFCV's flip
    alone took about 20 s to compile on the 2-core CI machine).
    """

    def __init__(self, spec: AugSpec):
        super().__init__()
        self.spec = spec

    def declare_state_and_memory(self, previous_state):
        s = self.spec.img_size
        h = self.metadata["height"].astype(np.int64)
        w = self.metadata["width"].astype(np.int64)
        out = (s, s, 3)
        return (
            replace(previous_state, jit_mode=True, shape=out, dtype=_U8),
            (AllocationQuery(out, _U8), AllocationQuery((int((h * w).max()) * 3,), _U8),
             AllocationQuery((int(w.max()) * 3,), _F4)),  # one float row of the area shrink
        )

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, resize_c = _imdecode, _resize_crop
        jpg = IMAGE_MODES["jpg"]
        sp = self.spec
        scale_lo, scale_hi = float(sp.rrc_scale[0]), float(sp.rrc_scale[1])
        ratio_lo, ratio_hi = math.log(sp.rrc_ratio[0]), math.log(sp.rrc_ratio[1])
        flip_p = float(sp.flip_p)

        def decode(batch_indices, my_storage, metadata, storage_state):
            dst, decoded, row = my_storage
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = mem_read(field["data_ptr"], storage_state)
                h, w = np.int64(field["height"]), np.int64(field["width"])
                if field["mode"] == jpg:
                    img = decoded[i][: h * w * 3].reshape(h, w, 3)
                    imdecode_c(data, img, np.uint32(h), np.uint32(w), np.uint32(h), np.uint32(w), 0, 0, 1, 1,
                               False, False)
                else:
                    img = data.reshape(h, w, 3)
                top, left, ch, cw = rrc_box(h, w, scale_lo, scale_hi, ratio_lo, ratio_hi)
                if ch >= dst.shape[1] and cw >= dst.shape[2]:  # a shrink: the area filter, faster than OpenCV's
                    resize_area(img, top, top + ch, left, left + cw, dst[i], row[i])
                else:  # enlarging either side: OpenCV's INTER_AREA (bilinear when enlarging)
                    resize_c(img, top, top + ch, left, left + cw, dst[i])
                if np.random.random() < flip_p:
                    mirror_rows(dst[i])
            return dst[: len(batch_indices)]

        decode.is_parallel = True
        return decode
