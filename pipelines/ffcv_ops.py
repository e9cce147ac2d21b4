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

View 2's ops are the reference's (``photometric.py``): ``StrongView`` draws
each image's parameters as the reference does, from uniforms of numba's
per-thread generator, and applies them with the compiled kernel the torch
backend and DALI's CPU graph use (``photometric_numba.strong_hwc``). Until
2026-12 FFCV had kernels of its own (the jitter ops one at a time in a random
order, torchvision's way): twice the CPU time, and a deviation to explain.

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

from .area_resize import cubic_taps, jpeg_scale_denominator, resize_area, shorter_side_size  # noqa: E402  (numba cache folder set there, before the kernels below)
from .photometric import NUM_UNIFORMS  # noqa: E402
from .photometric_numba import normalize_constants_np, packed_from_uniforms, packed_width, strong_hwc  # noqa: E402
from .src_windows import mirror_rows, window_hwc  # noqa: E402
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


# ---------------------------------------------------------------- geometry (SRC)


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


# ---------------------------------------------------------------- normalisation (CPU-only runs)


@_jit
def normalize_views(src, dst, planar, table):
    """``normalize_view`` of each view of a uint8 batch (n, h, w, 3) into float32 ``dst`` ((n, 3, h, w) if
    ``planar``, else (n, h, w, 3)): how the CPU-only loader copies a batch out of FFCV's buffers."""
    for i in range(src.shape[0]):
        normalize_view(src[i], dst[i], planar, table)


@_jit
def normalize_view(src, dst, planar, table):
    """uint8 (h, w, 3) ``src`` normalised into float32 ``dst`` ((3, h, w) if ``planar``, else (h, w, 3)) by table
    look-up: ``table[c, v]`` holds v * scale[c] + shift[c] (``normalization_table``), which saves the uint8 ->
    float conversion and the multiply-add per value (about 40 % of the pass)."""
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


def normalization_table(spec: AugSpec) -> np.ndarray:
    """(3, 256) float32: row c holds channel c's normalised value of each uint8 (``normalize_view``), by the
    map every other normalisation uses (``batch.normalize_constants``)."""
    scale, shift = normalize_constants_np(spec)
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
    """View 2's photometric ops on view ``index``, uint8 into this operation's own buffer, in FFCV's threads.

    The reference's ops and parameters: per image, ``NUM_UNIFORMS`` uniforms from numba's per-thread
    generator become the packed parameters of ``photometric_numba`` (``packed_from_uniforms``, the
    numba twin of ``packed_params(params_from_uniforms(...))``), and ``photometric_numba.strong_hwc``
    applies them, the kernel the torch backend and DALI's CPU graph run.
    """

    def __init__(self, spec: AugSpec, index: int):
        super().__init__()
        self.spec, self.index = spec, index

    def declare_state_and_memory(self, previous_state):
        shape = previous_state.shape[1:]
        return replace(previous_state, jit_mode=True, shape=shape, dtype=_U8), AllocationQuery(shape, _U8)

    def generate_code(self):
        sp = self.spec
        my_range = Compiler.get_iterator()
        index, width, n_uniforms = self.index, packed_width(sp), NUM_UNIFORMS
        strengths = np.array([sp.brightness, sp.contrast, sp.saturation, sp.hue], np.float64)
        ops = np.array([STRONG_OPS.index(op) for op in sp.strong_ops], np.int64)
        jitter_p, sigma_lo, sigma_hi = float(sp.jitter_p), float(sp.blur_sigma[0]), float(sp.blur_sigma[1])
        threshold, no_norm = int(sp.solarize_threshold), np.empty(0, np.float32)

        def strong(images, dst):
            n = images.shape[0]
            for i in my_range(n):
                u = np.random.random(n_uniforms)
                packed = np.empty(width, np.float32)
                packed_from_uniforms(u, jitter_p, strengths, ops, sigma_lo, sigma_hi, packed)
                strong_hwc(images[i, index], packed, threshold, no_norm, no_norm, False, dst[i].transpose(2, 0, 1))
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
