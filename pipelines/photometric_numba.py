"""View 2's photometric ops on the CPU in one compiled pass per image (the torch backend's loader, numba).

The same definitions as ``photometric.py`` (which documents them and stays the
reference): the composed colour jitter ``clamp(M x + k Y(mean x))``, then one
of grayscale / solarize / blur, then rounding to whole levels. There the ops
are a handful of torch calls per chunk of images, each a pass over float32
memory (about 0.67 CPU ms per 224 px image on a 2-core EPYC); here each image
is read once, jittered and put through its 3-augment op in a cache-sized
float buffer, and rounded on the way out, with the GIL released so the
loader's threads run it in parallel.

The results equal the torch ops up to float rounding: sums in another order
or fused differently can move a value lying within a few ulps of a half
level to the other whole level (``tests/test_photometric.py`` bounds how
often). ``photometric.apply_strong_rounded`` / ``apply_strong_normalised`` and
``batch.normalize_into`` use this module for uint8 CPU tensors when numba is
installed, and the torch ops otherwise (``photometric._numba_kernels``).
"""

from __future__ import annotations

import numpy as np
import torch

from .numba_cache import jit as _jit
from .photometric import _MAP_COS, _MAP_LUMA, _MAP_SIN
from .src_windows import reflect
from .spec import STRONG_OPS, AugSpec

GRAYSCALE, SOLARIZE, BLUR = (STRONG_OPS.index(op) for op in ("grayscale", "solarize", "blur"))
_LR, _LG, _LB = np.float32(0.299), np.float32(0.587), np.float32(0.114)  # photometric.LUMA


@_jit
def _blur_rows(src, dst, taps, half, line):
    """The horizontal pass: each row padded by reflection into ``line``, then the taps as whole-row sums
    (tap outer, pixel inner: contiguous loops the compiler vectorises). The shifted rows are slices, so
    every index in the loops is a plain loop counter: an index numba cannot prove non-negative gets a
    wrap-around check per access, which kept this loop scalar (10x slower)."""
    c_n, h, w = src.shape
    w0 = taps[half]
    middle = line[half : half + w]
    for c in range(c_n):
        for y in range(h):
            row = src[c, y]
            for x in range(w):
                middle[x] = row[x]
            for d in range(1, half + 1):
                line[half - d] = row[d]
                line[half + w - 1 + d] = row[w - 1 - d]
            out = dst[c, y]
            for x in range(w):
                out[x] = middle[x] * w0
            for d in range(1, half + 1):
                wd = taps[half + d]
                left = line[half - d : half - d + w]
                right = line[half + d : half + d + w]
                for x in range(w):
                    out[x] += wd * (left[x] + right[x])


@_jit
def _blur_columns(src, dst, taps, half):
    """The vertical pass: each output row a weighted sum of whole (reflected) rows of ``src``."""
    c_n, h, w = src.shape
    w0 = taps[half]
    for c in range(c_n):
        for y in range(h):
            out = dst[c, y]
            centre = src[c, y]
            for x in range(w):
                out[x] = centre[x] * w0
            for d in range(1, half + 1):
                wd = taps[half + d]
                above = src[c, reflect(y - d, h)]
                below = src[c, reflect(y + d, h)]
                for x in range(w):
                    out[x] += wd * (above[x] + below[x])


# One image's parameters, as the compiled ops read them: a float32 row (``packed_params``).
PACK_JITTER = 0  # 1: apply the jitter
PACK_M = 1  # 9 values: the jitter's 3 x 3 matrix M, row-major (``photometric.jitter_matrix``)
PACK_K = 10  # the jitter offset's weight k on the image's mean luma
PACK_OP = 11  # the ``STRONG_OPS`` index, or -1
PACK_HALF = 12  # the blur's half-window; 0: no blur
PACK_TAPS = 13  # 2 * half + 1 blur weights (``photometric.gaussian_taps``), then zeros


@_jit
def strong_one(x, packed, threshold, scale, shift, normalise, dst, work, scratch, line):
    """``dst`` = view 2's ops on one image ``x`` (uint8, (3, H, W), any strides), rounded, as float32.

    ``packed``: the image's row of ``packed_params``. With ``normalise``, ``dst`` receives
    ``level * scale[c] + shift[c]`` (``batch.normalize_into``'s two roundings) instead of the level.
    ``dst`` may have any strides; work and scratch: float32 (3, H, W) buffers, line one of W + 2 * half + 1.
    """
    _, h, w = x.shape
    level = np.float32(threshold - 0.5)
    y = work
    if packed[PACK_JITTER] > 0.5:
        sr = 0.0
        sg = 0.0
        sb = 0.0
        for r in range(h):
            for c in range(w):
                sr += x[0, r, c]
                sg += x[1, r, c]
                sb += x[2, r, c]
        count = h * w
        mean_luma = np.float32(sr / count) * _LR + np.float32(sg / count) * _LG + np.float32(sb / count) * _LB
        t = np.float32(packed[PACK_K] * mean_luma)
        m00, m01, m02 = packed[PACK_M], packed[PACK_M + 1], packed[PACK_M + 2]
        m10, m11, m12 = packed[PACK_M + 3], packed[PACK_M + 4], packed[PACK_M + 5]
        m20, m21, m22 = packed[PACK_M + 6], packed[PACK_M + 7], packed[PACK_M + 8]
        for r in range(h):
            for c in range(w):
                vr = np.float32(x[0, r, c])
                vg = np.float32(x[1, r, c])
                vb = np.float32(x[2, r, c])
                y[0, r, c] = min(max(m00 * vr + m01 * vg + m02 * vb + t, np.float32(0)), np.float32(255))
                y[1, r, c] = min(max(m10 * vr + m11 * vg + m12 * vb + t, np.float32(0)), np.float32(255))
                y[2, r, c] = min(max(m20 * vr + m21 * vg + m22 * vb + t, np.float32(0)), np.float32(255))
    else:
        for ch in range(3):
            for r in range(h):
                for c in range(w):
                    y[ch, r, c] = x[ch, r, c]
    op = int(packed[PACK_OP])
    half = int(packed[PACK_HALF])
    if op == GRAYSCALE:
        for r in range(h):
            for c in range(w):
                g = _LR * y[0, r, c] + _LG * y[1, r, c] + _LB * y[2, r, c]
                y[0, r, c] = g
                y[1, r, c] = g
                y[2, r, c] = g
    elif op == SOLARIZE:
        for ch in range(3):
            for r in range(h):
                for c in range(w):
                    if y[ch, r, c] >= level:
                        y[ch, r, c] = np.float32(255) - y[ch, r, c]
    elif op == BLUR and half > 0:
        taps = packed[PACK_TAPS : PACK_TAPS + 2 * half + 1]
        _blur_rows(y, scratch, taps, half, line)
        _blur_columns(scratch, y, taps, half)
    for ch in range(3):
        if normalise:
            a, b = scale[ch], shift[ch]
            for r in range(h):
                for c in range(w):
                    dst[ch, r, c] = np.rint(y[ch, r, c]) * a + b
        else:
            for r in range(h):
                for c in range(w):
                    dst[ch, r, c] = np.rint(y[ch, r, c])


@_jit
def strong_hwc(image, packed, threshold, scale, shift, normalise, dst):
    """``strong_one`` for one C-contiguous HWC uint8 image (DALI's operator sees one at a time), with buffers
    of its own. The image is split into planes first: ``strong_one`` on a transposed view compiles to
    strided loops that do not vectorise, twice the time of the split and the planar pass together."""
    h, w = image.shape[0], image.shape[1]
    n = h * w
    planar = np.empty((3, h, w), np.uint8)
    flat = image.reshape(3 * n)
    red, green, blue = planar[0].reshape(n), planar[1].reshape(n), planar[2].reshape(n)
    for i in range(n):
        red[i] = flat[3 * i]
        green[i] = flat[3 * i + 1]
        blue[i] = flat[3 * i + 2]
    work = np.empty((3, h, w), np.float32)
    scratch = np.empty((3, h, w), np.float32)
    line = np.empty(w + 2 * int(packed[PACK_HALF]) + 1, np.float32)
    strong_one(planar, packed, threshold, scale, shift, normalise, dst, work, scratch, line)


@_jit
def strong_rounded_kernel(x, packed, threshold, scale, shift, normalise, out, work, scratch, line):
    """``strong_one`` for each image of ``x`` (uint8, (n, 3, H, W)) into ``out[i]``, sharing the buffers."""
    for i in range(x.shape[0]):
        strong_one(x[i], packed[i], threshold, scale, shift, normalise, out[i], work, scratch, line)


@_jit
def normalize_kernel(x, scale, shift, out):
    """``out = x * scale[c] + shift[c]`` for uint8 ``x`` (n, 3, H, W), any strides: one pass, same roundings."""
    n, c_n, h, w = x.shape
    for i in range(n):
        for ch in range(c_n):
            a, b = scale[ch], shift[ch]
            for r in range(h):
                for c in range(w):
                    out[i, ch, r, c] = np.float32(x[i, ch, r, c]) * a + b


def normalize_constants_np(spec: AugSpec) -> tuple[np.ndarray, np.ndarray]:
    """``batch.normalize_constants`` as two float32 arrays of 3: what the kernels' ``scale`` and ``shift`` are."""
    from .batch import normalize_constants

    scale, shift = normalize_constants(spec, "cpu")
    return scale.view(-1).numpy(), shift.view(-1).numpy()


def packed_width(spec: AugSpec) -> int:
    """Length of a ``packed_params`` row wide enough for any image of ``spec`` (its widest blur window)."""
    return PACK_TAPS + spec.blur_kernel_size


@_jit
def packed_from_uniforms(u, jitter_p, strengths, ops, sigma_lo, sigma_hi, out):
    """``packed_params(params_from_uniforms(spec, u))`` for one image's ``NUM_UNIFORMS`` uniforms ``u``, in
    compiled code, into ``out`` (a float32 row of ``packed_width(spec)``): for a loader drawing its uniforms
    in threads of its own (FFCV's). ``strengths``: brightness, contrast, saturation, hue; ``ops``: the
    ``STRONG_OPS`` indices allowed.

    The same arithmetic in the same order as those two functions (the parameters rounded to float32 as
    they store them, then the jitter composed in float64, as ``photometric.jitter_matrix``), so the rows
    are the same numbers up to the last float32 bit (the blur's weights are summed in another order;
    ``tests/test_photometric.py`` compares them). Weights of images without blur stay 0 here, where the
    host leaves a tap the kernel never reads.
    """
    out[:] = 0.0
    on = u[0] < jitter_p
    factors = np.ones(3)
    for j in range(3):  # brightness, contrast, saturation: uniform in [max(0, 1 - x), 1 + x], as float32
        lo, hi = max(0.0, 1.0 - strengths[j]), 1.0 + strengths[j]
        factors[j] = np.float64(np.float32(lo + (hi - lo) * u[1 + j])) if on else 1.0
    hue = np.float64(np.float32((2.0 * u[4] - 1.0) * strengths[3])) if on else 0.0
    b, c, s = factors[0], factors[1], factors[2]
    theta = 2.0 * np.pi * hue
    cos, sin = np.cos(theta) * s, np.sin(theta) * s
    for r in range(3):
        for q in range(3):
            out[PACK_M + 3 * r + q] = (b * c) * (_MAP_LUMA[r, q] + cos * _MAP_COS[r, q] + sin * _MAP_SIN[r, q])
    out[PACK_JITTER] = 1.0 if on else 0.0
    out[PACK_K] = b * (1.0 - c)
    op = ops[min(int(u[5] * ops.size), ops.size - 1)]
    out[PACK_OP] = op
    if op == BLUR:
        sigma = np.float64(np.float32(sigma_lo + (sigma_hi - sigma_lo) * u[6]))
        half = int(np.ceil(3.0 * sigma))  # photometric.blur_window(sigma) // 2
        out[PACK_HALF] = half
        total = 0.0
        for d in range(-half, half + 1):
            total += np.exp(-(d * d) / (2.0 * sigma * sigma))
        for d in range(-half, half + 1):
            out[PACK_TAPS + half + d] = np.exp(-(d * d) / (2.0 * sigma * sigma)) / total


def packed_params(params: torch.Tensor) -> np.ndarray:
    """(n, PACK_TAPS + widest window) float32 rows of the compiled ops' parameters, from
    (n, ``photometric.NUM_PARAMS``) ``params``: the jitter composed (``photometric.jitter_matrix``) and the
    blur's weights made (``photometric.gaussian_taps``) once per image, here, not per pixel or per loader."""
    from . import photometric as ph

    p = params.detach().cpu().float()
    n = p.shape[0]
    m, k = ph.jitter_matrix(p)
    op = p[:, ph.STRONG_OP].round().long()
    blur = op == BLUR
    taps, halves = ph.gaussian_taps(torch.where(blur, p[:, ph.BLUR_SIGMA], torch.ones(n)))
    halves = torch.where(blur, halves, 0).tolist()
    centre = taps.shape[1] // 2
    packed = np.zeros((n, PACK_TAPS + taps.shape[1]), dtype=np.float32)
    packed[:, PACK_JITTER] = (p[:, ph.JITTER_ON] > 0.5).numpy()
    packed[:, PACK_M : PACK_M + 9] = m.reshape(n, 9).numpy()
    packed[:, PACK_K] = k.numpy()
    packed[:, PACK_OP] = op.numpy()
    packed[:, PACK_HALF] = halves
    for i, half in enumerate(halves):
        packed[i, PACK_TAPS : PACK_TAPS + 2 * half + 1] = taps[i, centre - half : centre + half + 1].numpy()
    return packed


def strong_rounded(x: torch.Tensor, params: torch.Tensor, spec: AugSpec, out: torch.Tensor,
                   normalise: bool = False) -> None:
    """View 2's ops on uint8 CPU images ``x`` (n, 3, H, W), rounded, into float32 ``out`` (same shape, any
    strides); with ``normalise``, normalised as ``batch.normalize_into`` would."""
    packed = packed_params(params)
    scale, shift = normalize_constants_np(spec)
    plane = tuple(x.shape[1:])
    strong_rounded_kernel(x.numpy(), packed, int(spec.solarize_threshold), scale, shift, normalise, out.numpy(),
                          np.empty(plane, dtype=np.float32), np.empty(plane, dtype=np.float32),
                          np.empty(x.shape[3] + packed.shape[1] - PACK_TAPS, dtype=np.float32))


def normalize(x: torch.Tensor, out: torch.Tensor, spec: AugSpec) -> None:
    """uint8 CPU images (n, 3, H, W) normalised into float32 ``out`` (any strides), equal to ``batch.normalize_into``."""
    scale, shift = normalize_constants_np(spec)
    normalize_kernel(x.numpy(), scale, shift, out.numpy())
