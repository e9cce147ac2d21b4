"""SRC's views cut in one compiled pass each (numba): the window copy every CPU backend shares.

SRC (``spec.py``, the LUT recipe): the shorter side resized to S, the image reflect-padded by P, and
each view an S x S window at a uniform offset of the padded image, mirrored with probability flip_p.
``window_hwc`` writes one such window straight from the unpadded HWC image: the padded image is never
built. Each output row reads its source row through the reflection; the columns that fall inside the
image are one contiguous copy (mirrored: ``_mirror_copy``), and at most P columns on either side are
reflected one pixel at a time. The offsets and the flip are the caller's, drawn the way its backend
draws them (the torch backend's hashed uniforms, FFCV's numba generator, DALI's per-sample draws), so
the kernel decides no randomness.

Used by the torch backend's loader threads (``torch_backend.DualViewDataset``, NHWC views), FFCV's
SRC decoder (``ffcv_ops.src_crop``) and DALI's CPU graph (a numba operator in ``dali_backend``).
The torch backend's numpy ``window_into`` is the reference it is tested against
(``tests/test_torch_pipeline.py``), and what runs without numba or for the other padding modes.
``mirror_rows`` is MAE's in-place flip, shared the same way by FFCV and DALI.
"""

from __future__ import annotations

import numba
import numpy as np

from .numba_cache import jit as _jit

# The window's helpers are inlined into their callers rather than called: FFCV's stage code types the
# arrays it passes as read-only, and a separate kernel called with such arrays broke numba's dispatch
# (KeyError in ``nopython_signatures``) when the process had compiled it for writable arrays already
# (the torch backend's or DALI's call). Inlined, the helpers are typed as part of each caller.
_inline = numba.njit(inline="always")


@_jit
def reflect(i, n):
    """Index ``i`` of a line of ``n`` values mirrored about its end values, which are not repeated
    (numpy's and torch's 'reflect' padding); valid for an overhang below ``n``."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


@_inline
def _copy_bytes(dst, d, src, s, n):
    # Unsigned offsets: with signed ones numba guards every access against negative wraparound and the
    # loop does not vectorise (30x slower).
    d, s = np.uint64(d), np.uint64(s)
    for i in range(np.uint64(n)):
        dst[d + i] = src[s + i]


@_inline
def _mirror_copy(dst, d, src, s, first, stop):
    """Output pixels [first, stop) of a mirrored row: pixel c from the source pixel at byte s - 3c.

    A plain pixel loop on unsigned offsets vectorises; a 4-pixel unrolled copy was 20x slower."""
    d, s, three = np.uint64(d), np.uint64(s), np.uint64(3)
    for c in range(np.uint64(first), np.uint64(stop)):
        sc, dc = s - three * c, d + three * c
        dst[dc], dst[dc + np.uint64(1)], dst[dc + np.uint64(2)] = src[sc], src[sc + np.uint64(1)], src[sc + np.uint64(2)]


@_inline
def window_hwc(dst, src, h, w, size, pad, top, left, flip):
    """``dst`` (flat S*S*3 bytes) = the S x S window at (top, left) of ``src`` (flat h*w*3 bytes, HWC)
    reflect-padded by ``pad``, mirrored left-right when ``flip``. Needs S > pad and min(h, w) > pad."""
    x0 = left - pad  # image column of the window's first (unmirrored) column
    a = min(max(-x0, 0), size)  # window columns [0, a) reflect about column 0,
    b = max(min(w - x0, size), a)  # [b, S) about column w - 1; [a, b) lie inside the image
    for r in range(size):
        so = reflect(top + r - pad, h) * w * 3
        do = r * size * 3
        for k in range(a + size - b):  # the window's columns in the padding
            wc = k if k < a else b + k - a
            c = size - 1 - wc if flip else wc
            s = so + 3 * reflect(x0 + wc, w)
            dst[do + 3 * c] = src[s]
            dst[do + 3 * c + 1] = src[s + 1]
            dst[do + 3 * c + 2] = src[s + 2]
        if not flip:
            _copy_bytes(dst, do + 3 * a, src, so + 3 * (x0 + a), 3 * (b - a))
        else:
            _mirror_copy(dst, do, src, so + 3 * (x0 + size - 1), size - b, size - a)


@_inline
def mirror_rows(img):
    """Each row of a C-contiguous (h, w, 3) uint8 image reversed in place: MAE's flip, after its crop is
    resized (FFCV's ``RrcFlipDecoder``, DALI's ``square_flip_cpu``). Unsigned offsets, so the swaps carry
    no negative-index checks."""
    flat = img.reshape(img.shape[0] * img.shape[1] * 3)
    w, three = np.uint64(img.shape[1]), np.uint64(3)
    for r in range(np.uint64(img.shape[0])):
        row = r * w * three
        for c in range(w // np.uint64(2)):
            a, b = row + three * c, row + three * (w - np.uint64(1) - c)
            for k in range(three):
                flat[a + k], flat[b + k] = flat[b + k], flat[a + k]


@_jit
def src_views_hwc(view1, view2, image, pad, top1, left1, flip1, top2, left2, flip2):
    """Both SRC views of one C-contiguous (h, w, 3) uint8 image into C-contiguous (S, S, 3) views.

    One call per image (a numba call from Python costs a few microseconds; the two windows of a 224 px
    image copy in about ten), with the GIL released."""
    h, w, size = image.shape[0], image.shape[1], view1.shape[0]
    src = image.reshape(h * w * 3)
    window_hwc(view1.reshape(size * size * 3), src, h, w, size, pad, top1, left1, flip1)
    window_hwc(view2.reshape(size * size * 3), src, h, w, size, pad, top2, left2, flip2)
