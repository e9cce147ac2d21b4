"""The DALI backend: ImageFolder (file reader) or converted shards (webdataset reader) -> ``Batch``.

One graph per recipe, built from the small functions below, every number
from ``AugSpec``:

* LUT: decode once -> resize the shorter side to S once -> reflect-pad once;
  then per view an independent S x S crop and flip (on the CPU all of that
  after the resize is one numba operator, ``src_views_cpu``: DALI's CPU
  copy kernels made it cost more than the decode; and the CPU shrink is
  FFCV's area filter as a numba operator, ``area_shrink_cpu``: DALI's
  antialiased resize cost more than the decode too); view 2 also gets color
  jitter and exactly one of grayscale / solarize / blur. On the CPU with
  numba those ops and the normalisation are one numba operator,
  ``strong_normalised_cpu``, running the torch backend's compiled CPU ops
  (``photometric_numba``) on parameters drawn per batch in the loader's
  process (an external source). Elsewhere (the GPU graph; no numba) they
  are DALI's operators: jitter under ``if coin(jitter_p)`` and the op chosen
  per sample with DALI conditionals (``enable_conditionals``; computing all
  three and selecting was about 2x slower).
* MAE: ``decoders.image_random_crop`` (decodes only the crop) -> resize to
  S x S -> flip (on the CPU with numba, one operator, ``square_flip_cpu``:
  the area filter along a side that shrinks, bicubic along one that grows).

Devices: with a CUDA device the JPEG decode is ``mixed`` (nvJPEG) and every
image op, view 2's photometric ops included, runs on the GPU; the views
arrive normalised there, whatever ``photometric_on`` says. Otherwise the
whole graph is CPU-only (``device_id=None``), and ``photometric_on`` picks:
``loader`` runs view 2's ops and the normalisation in DALI's threads (float
views out: what CPU training wants); ``device`` stops at the uint8 crops and
hands view 2's parameters to ``finish_batch``, which applies the ops batched
wherever the batch goes (what a GPU run that decodes on the CPU wants).
Either way the CPU graph's view-2 parameters are drawn per batch in this
process (``strong_params.py``): batch k gets the same ones in both modes.

Color jitter is an implementation of torchvision's, not a copy: brightness
and contrast are one arithmetic expression around the image's mean luma,
saturation and hue one ``fn.hsv`` (a linear map about the gray axis, YIQ
hue rotation). All four are linear and commute, so torchvision's random
order changes nothing up to intermediate clamping; the difference from the
torch reference is the hue model (YIQ rotation keeps luma, HSV keeps the
maximum channel), which moves per-channel statistics by far less than the
parity tolerance.

Sharding and epochs: ``shard_id=rank, num_shards=world_size,
stick_to_shard=True``; ``len()`` is the smallest shard's full batches (the
same on every rank; last-batch policy DROP). A new pipeline is built for
each epoch, seeded by (seed, epoch, rank), so epoch e's order and
augmentations do not depend on what ran before (resume = skip
``start_batch`` batches). ImageFolder input: the file list is permuted per
epoch with (seed, epoch), a global shuffle, then sharded. Shards: DALI
shuffles within a buffer of ``shuffle_buffer`` samples; the converter stored
the samples in random order.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from lut_fast.datasets.dali_writer import read_manifest
from lut_fast.datasets.imagefolder import scan_image_folder
from lut_fast.errors import UserError

from . import formats, malloc
from .batch import Batch, RawBatch, finish_batch, resolve_photometric_on
from .contract import LoaderOptions, check_aug_support
from .spec import STRONG_OPS, AugSpec
from .strong_params import strong_params_for_batch

_INTERP = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}


# ---------------------------------------------------------------- small graph pieces


def _float(x):
    return fn.cast(x, dtype=types.FLOAT)


def _int(x):
    return fn.cast(x, dtype=types.INT64)


def _uniform(lo: float, hi: float):
    """A per-sample uniform draw, or the constant when the range is empty (strength 0)."""
    return fn.random.uniform(range=[lo, hi]) if hi > lo else lo


def _randint(n):
    """Per-sample integer uniform in [0, n) for an INT64 DataNode n >= 1."""
    return dmath.min(_int(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * _float(n))), n - 1)


def decode(jpegs, device: str):
    # EXIF orientation ignored, like torchvision's ImageFolder (PIL) and the converters.
    return fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                             adjust_orientation=False)


def _filters(spec: AugSpec) -> dict:
    """fn.resize filter arguments: ``spec.interpolation`` when enlarging; for bicubic, shrinking uses DALI's
    antialiased linear (triangle) filter, a third cheaper on the CPU than antialiased cubic. Against PIL's
    bicubic on ImageNet-sized photos shrunk to 224 px it differs by 0.9 gray levels on average (antialiased
    cubic: 0.6; PSNR 46 vs 49 dB) and keeps the pixel spread (std ratio 0.999)."""
    mag = _INTERP[spec.interpolation]
    return dict(min_filter=types.INTERP_LINEAR if spec.interpolation == "bicubic" else mag, mag_filter=mag,
                antialias=True)


def _resized_size(shape, s: int):
    """(height, width) with the shorter side at s and the longer one rounded, from an image's (h, w, c)."""
    h, w = _float(shape[0]), _float(shape[1])
    short = dmath.min(h, w)
    return (dmath.max(_int(dmath.floor(h * s / short + 0.5)), s),
            dmath.max(_int(dmath.floor(w * s / short + 0.5)), s))


def resize_shorter(jpegs, images, spec: AugSpec, need_size: bool = True):
    """Shorter side to S (longer side rounded); returns the images and their new (height, width).

    Images stored with their shorter side at S already (``convert dali --shorter-side S``) skip the
    resize: it would be an identity that still costs a full resampling pass. ``need_size=False`` (the
    CPU graph with numba, whose views operator reads the sizes itself) returns no sizes and works them
    out only for the samples it enlarges: a dozen scalar operators per sample less, about 0.05 ms per
    image; it shrinks with ``area_shrink_cpu`` (an area filter), not ``fn.resize``.
    """
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)
    if not need_size:
        short = dmath.min(shape[0], shape[1])
        if short == spec.img_size:
            resized = images
        elif short > spec.img_size:
            resized = area_shrink_cpu(images, spec.img_size)
        else:
            nh, nw = _resized_size(shape, spec.img_size)
            resized = fn.resize(images, resize_y=_float(nh), resize_x=_float(nw), **_filters(spec))
        return resized, None, None
    nh, nw = _resized_size(shape, spec.img_size)
    if dmath.min(shape[0], shape[1]) == spec.img_size:
        resized = images
    else:
        resized = fn.resize(images, resize_y=_float(nh), resize_x=_float(nw), **_filters(spec))
    return resized, nh, nw


def _area_shrink_kernel(size: int):
    """Per-sample body and output shapes of ``area_shrink_cpu``: shorter side to ``size`` (longer side rounded)."""
    import numpy as np  # numba resolves globals of the closure; keep them local and explicit

    from .area_resize import resize_area, shorter_side_size

    S = size

    def kernel(out, image):
        h, w = image.shape[0], image.shape[1]
        resize_area(image, 0, h, 0, w, out, np.empty(3 * w, np.float32))

    def setup(outs, ins):
        for i in range(len(outs[0])):
            nh, nw = shorter_side_size(ins[0][i][0], ins[0][i][1], S)  # as ``_resized_size``
            outs[0][i][0], outs[0][i][1], outs[0][i][2] = nh, nw, 3

    return kernel, setup


@functools.lru_cache(maxsize=8)
def _area_shrink_op(size: int):
    """DALI's numba operator around ``_area_shrink_kernel``, compiled once per process and size."""
    from nvidia.dali.plugin.numba import NumbaFunction

    kernel, setup = _area_shrink_kernel(size)
    return NumbaFunction(run_fn=kernel, setup_fn=setup, out_types=[types.UINT8], in_types=[types.UINT8],
                         outs_ndim=[3], ins_ndim=[3], batch_processing=False, device="cpu")


def area_shrink_cpu(images, size: int):
    """Shorter side of uint8 HWC CPU images, all with both sides above ``size``, down to ``size`` with the
    area filter of ``area_resize`` (OpenCV's INTER_AREA weights; FFCV's filter): a third of the CPU time
    of ``fn.resize``'s antialiased filter on ImageNet-sized photos (docs/benchmarks/README.md)."""
    return fn.reshape(_area_shrink_op(size)(images), layout="HWC")  # the numba operator sets no layout; no copy


def _square_flip_kernel(size: int, flip_p: float):
    """Per-sample body and output shapes of ``square_flip_cpu``: ``area_resize.resize_area`` to ``size`` x
    ``size``, then a mirror in place when the sample's draw is below ``flip_p``."""
    import numpy as np  # numba resolves globals of the closure; keep them local and explicit

    from .area_resize import resize_area
    from .src_windows import mirror_rows

    S = size

    def kernel(out, image, draw):
        h, w = image.shape[0], image.shape[1]
        resize_area(image, 0, h, 0, w, out, np.empty(3 * w, np.float32))
        if draw[0] < flip_p:
            mirror_rows(out)

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0], outs[0][i][1], outs[0][i][2] = S, S, 3

    return kernel, setup


@functools.lru_cache(maxsize=8)
def _square_flip_op(size: int, flip_p: float):
    """DALI's numba operator around ``_square_flip_kernel``, compiled once per process and setting."""
    from nvidia.dali.plugin.numba import NumbaFunction

    kernel, setup = _square_flip_kernel(size, flip_p)
    return NumbaFunction(run_fn=kernel, setup_fn=setup, out_types=[types.UINT8], in_types=[types.UINT8, types.FLOAT],
                         outs_ndim=[3], ins_ndim=[3, 1], batch_processing=False, device="cpu")


def square_flip_cpu(crops, spec: AugSpec):
    """MAE's uint8 HWC CPU crops to S x S (``area_resize.resize_area``: the area filter along a side that
    shrinks, as ``area_shrink_cpu``; bicubic along one that grows) and mirrored with probability flip_p, in one
    numba operator. DALI's ``fn.resize`` cost 0.7-1.0 ms per crop on the CPU, and a flip pass 0.1 ms more."""
    draw = fn.random.uniform(range=[0.0, 1.0], shape=[1])
    return fn.reshape(_square_flip_op(spec.img_size, float(spec.flip_p))(crops, draw), layout="HWC")


def reflect_pad(img, h, w, p: int):
    """numpy/torch 'reflect' padding by p pixels on each side of an HWC image of size (h, w)."""
    if p == 0:
        return img
    left = fn.flip(img[:, 1 : p + 1], horizontal=1)
    right = fn.flip(img[:, w - 1 - p : w - 1], horizontal=1)
    img = fn.cat(left, img, right, axis=1)
    top = fn.flip(img[1 : p + 1], horizontal=0, vertical=1)
    bottom = fn.flip(img[h - 1 - p : h - 1], horizontal=0, vertical=1)
    return fn.cat(top, img, bottom, axis=0)


def src_crop(padded, hp, wp, s: int):
    """A uniformly placed S x S window of the padded image (the flip comes with normalisation)."""
    top = _randint(hp - s + 1)
    left = _randint(wp - s + 1)
    return padded[top : top + s, left : left + s]


def _src_views_kernel(size: int, pad: int, flip_p: float):
    """The per-sample body of ``src_views_cpu``: both SRC views of one HWC uint8 image, written directly.

    ``draws`` holds (top, left, flip) uniforms in [0, 1) for each view. Each view is the S x S window at
    a uniformly drawn integer offset of the image reflect-padded by ``pad`` (numpy/torch 'reflect'),
    mirrored when its flip draw is below ``flip_p``, cut by the kernel all CPU backends share
    (``src_windows.window_hwc``: the padded image is never built).
    """
    import numpy as np  # numba resolves globals of the closure; keep them local and explicit

    from .src_windows import window_hwc

    S, P = size, pad

    def kernel(view1, view2, image, draws):
        h, w = image.shape[0], image.shape[1]
        src = image.reshape(h * w * 3)
        for v in range(2):
            dst = (view1 if v == 0 else view2).reshape(S * S * 3)
            n_top, n_left = h + 2 * P - S + 1, w + 2 * P - S + 1  # offsets of the window in the padded image
            top = min(int(np.floor(draws[3 * v] * n_top)), n_top - 1)
            left = min(int(np.floor(draws[3 * v + 1] * n_left)), n_left - 1)
            window_hwc(dst, src, h, w, S, P, top, left, draws[3 * v + 2] < flip_p)

    def setup(outs, ins):
        for o in range(len(outs)):
            for i in range(len(outs[o])):
                outs[o][i][0], outs[o][i][1], outs[o][i][2] = S, S, 3

    return kernel, setup


@functools.lru_cache(maxsize=8)
def _src_views_op(size: int, pad: int, flip_p: float):
    """DALI's numba operator around ``_src_views_kernel``, compiled once per process and setting (about
    a second) and reused by every epoch's pipeline."""
    from nvidia.dali.plugin.numba import NumbaFunction

    kernel, setup = _src_views_kernel(size, pad, flip_p)
    return NumbaFunction(run_fn=kernel, setup_fn=setup, out_types=[types.UINT8, types.UINT8],
                         in_types=[types.UINT8, types.FLOAT], outs_ndim=[3, 3], ins_ndim=[3, 1],
                         batch_processing=False, device="cpu")


@do_not_convert  # called while the graph is traced: plain Python, not for DALI's conditionals to rewrite
def fused_src_available() -> bool:
    """numba is importable (the ``dali`` extra brings it): the CPU graph uses ``src_views_cpu``; without it,
    the DALI operators the GPU graph uses (``reflect_pad``, ``src_crop``, a mirror), same pixels, slower."""
    return importlib.util.find_spec("numba") is not None


def src_views_cpu(image, spec: AugSpec, draws=None):
    """Both SRC views of the CPU graph (uint8 HWC, S x S, mirrored with probability flip_p) in one operator.

    Same pixels as ``reflect_pad`` + ``src_crop`` + a mirror, but DALI's CPU slice, concatenation and
    flip kernels move about 1 byte per nanosecond: padding, two crops and two flips cost 0.7 ms per
    image, more than decoding a 224 px JPEG. This writes each view once at memory speed. ``draws``
    (float32, 6 per sample: top, left, flip of view 1, then of view 2; uniform in [0, 1)) default to
    one per-sample random draw.
    """
    if draws is None:
        draws = fn.random.uniform(range=[0.0, 1.0], shape=[6])
    views = _src_views_op(spec.img_size, spec.src_padding, float(spec.flip_p))(image, draws)
    return tuple(fn.reshape(v, layout="HWC") for v in views)  # the numba operator sets no layout; no copy


def _strong_normalised_kernel(spec: AugSpec, layout: str):
    """The per-sample body of ``strong_normalised_cpu``: ``photometric_numba.strong_hwc`` on one HWC view, into
    a float32 view in ``layout`` (CHW: contiguous writes; HWC, for channels-last: strided ones)."""
    from .photometric_numba import normalize_constants_np, strong_hwc

    threshold = int(spec.solarize_threshold)
    scale, shift = normalize_constants_np(spec)

    def kernel_chw(out, image, packed):
        strong_hwc(image, packed, threshold, scale, shift, True, out)

    def kernel_hwc(out, image, packed):
        strong_hwc(image, packed, threshold, scale, shift, True, out.transpose((2, 0, 1)))

    channels_first = layout == "CHW"

    def setup(outs, ins):
        for i in range(len(outs[0])):
            h, w = ins[0][i][0], ins[0][i][1]
            if channels_first:
                outs[0][i][0], outs[0][i][1], outs[0][i][2] = 3, h, w
            else:
                outs[0][i][0], outs[0][i][1], outs[0][i][2] = h, w, 3

    return (kernel_chw if channels_first else kernel_hwc), setup


@functools.lru_cache(maxsize=8)
def _strong_normalised_op(spec: AugSpec, layout: str):
    """DALI's numba operator around ``_strong_normalised_kernel``, compiled once per process and setting."""
    from nvidia.dali.plugin.numba import NumbaFunction

    kernel, setup = _strong_normalised_kernel(spec, layout)
    return NumbaFunction(run_fn=kernel, setup_fn=setup, out_types=[types.FLOAT], in_types=[types.UINT8, types.FLOAT],
                         outs_ndim=[3], ins_ndim=[3, 1], batch_processing=False, device="cpu")


def strong_normalised_cpu(view, packed, spec: AugSpec, layout: str):
    """View 2's ops and the normalisation of the CPU graph in one numba operator: float32 views in ``layout``.

    ``packed``: each sample's ``photometric_numba.packed_params`` row, from parameters drawn per batch in the
    loader's process (``strong_params.py``; an external source), so the ops and their parameters are the
    torch backend's and ``finish_batch``'s, computed by the same compiled function as the torch backend's
    CPU loader. DALI's own operators (``strong_augment``, then ``normalize_flip``) cost about 1.9 ms per
    224 px view here; this, 0.2-0.3.
    """
    return fn.reshape(_strong_normalised_op(spec, layout)(view, packed), layout=layout)


def color_jitter(x, spec: AugSpec, device: str):
    """torchvision ColorJitter(brightness, contrast, saturation, hue) as two linear DALI ops (see module doc).

    Brightness b and contrast c around the mean luma m: b * (c * x + (1 - c) * m). On the CPU that is
    ``brightness_contrast`` (uint8, about 3x faster than the arithmetic); on the GPU m lives on the GPU
    and DALI takes operator arguments only from the CPU, so there it is arithmetic on the image.
    """
    b = _uniform(max(0.0, 1.0 - spec.brightness), 1.0 + spec.brightness)
    c = _uniform(max(0.0, 1.0 - spec.contrast), 1.0 + spec.contrast)
    mean_luma = fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))
    if device == "cpu":
        y = fn.brightness_contrast(x, brightness=b, contrast=c, contrast_center=mean_luma)
    else:
        y = dmath.clamp(b * (c * x + (1.0 - c) * mean_luma), 0.0, 255.0)
    s = _uniform(max(0.0, 1.0 - spec.saturation), 1.0 + spec.saturation)
    hue_degrees = _uniform(-360.0 * spec.hue, 360.0 * spec.hue)
    return fn.hsv(y, hue=hue_degrees, saturation=s, dtype=types.UINT8)


def grayscale(x):
    g = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(g, g, g, axis=2)


def solarize(x, threshold: int):
    # 255 - x == x XOR 255 on uint8: invert exactly the pixels >= threshold.
    return fn.cast(x ^ (fn.cast(x >= threshold, dtype=types.UINT8) * 255), dtype=types.UINT8)


def gaussian_blur(x, spec: AugSpec):
    """Sigma ~ U(blur_sigma); window 2*ceil(3 sigma)+1 per sample (the torch reference uses
    spec.blur_kernel_size for every sigma: the weights beyond 3 sigma are 0.3 % of the mass), 1.5x faster."""
    sigma = fn.random.uniform(range=list(spec.blur_sigma))
    window = fn.cast(dmath.ceil(3.0 * sigma), dtype=types.INT32) * 2 + 1
    return fn.gaussian_blur(x, sigma=sigma, window_size=window)


def strong_augment(x, spec: AugSpec, device: str):
    """Jitter with probability jitter_p, then exactly one of spec.strong_ops, per sample."""
    if fn.random.coin_flip(probability=spec.jitter_p):
        x = color_jitter(x, spec, device)
    op = fn.random.choice([STRONG_OPS.index(name) for name in spec.strong_ops])
    if op == STRONG_OPS.index("grayscale"):
        x = grayscale(x)
    elif op == STRONG_OPS.index("solarize"):
        x = solarize(x, spec.solarize_threshold)
    else:
        x = gaussian_blur(x, spec)
    return x


def normalize_flip(x, spec: AugSpec, layout: str, flip: bool = True):
    """uint8 HWC -> float32 (x/255 - mean) / std in ``layout``, mirrored with probability flip_p (when ``flip``;
    views from ``src_views_cpu`` are mirrored already)."""
    mirror = fn.random.coin_flip(probability=spec.flip_p) if flip else 0
    return fn.crop_mirror_normalize(
        x, mirror=mirror, dtype=types.FLOAT, output_layout=layout,
        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
    )


def flip_uint8(x, spec: AugSpec):
    """uint8 HWC mirrored with probability flip_p, still uint8 HWC (normalisation is left to the device)."""
    return fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(probability=spec.flip_p), dtype=types.UINT8,
                                    output_layout="HWC")


def lut_views(jpegs, spec: AugSpec, device: str, layout: str, strong_in_graph: bool = True, packed=None):
    """Both LUT views. ``packed``: view 2's parameters (``strong_normalised_cpu``) for the CPU graph with numba
    and ``strong_in_graph``; None elsewhere (DALI draws them: ``strong_augment``)."""
    images = decode(jpegs, device)
    fused = device == "cpu" and fused_src_available()  # both views cut and mirrored by one operator
    base, h, w = resize_shorter(jpegs, images, spec, need_size=not fused)
    if fused:
        view1, view2 = src_views_cpu(base, spec)
        if not strong_in_graph:  # photometric_on=device: uint8 crops out, view 2's ops run in finish_batch
            return view1, view2
        view1 = normalize_flip(view1, spec, layout, flip=False)
        if packed is not None:
            return view1, strong_normalised_cpu(view2, packed, spec, layout)
        return view1, normalize_flip(strong_augment(view2, spec, device), spec, layout, flip=False)
    pad = spec.src_padding
    padded = reflect_pad(base, h, w, pad)
    hp, wp = h + 2 * pad, w + 2 * pad
    view1 = src_crop(padded, hp, wp, spec.img_size)
    view2 = src_crop(padded, hp, wp, spec.img_size)
    if not strong_in_graph:  # photometric_on=device: uint8 crops out, view 2's ops run in finish_batch
        return flip_uint8(view1, spec), flip_uint8(view2, spec)
    view2 = strong_augment(view2, spec, device)
    return normalize_flip(view1, spec, layout), normalize_flip(view2, spec, layout)


def mae_view(jpegs, spec: AugSpec, device: str, layout: str, uint8_out: bool = False):
    crop = fn.decoders.image_random_crop(
        jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB, adjust_orientation=False,
        random_area=list(spec.rrc_scale), random_aspect_ratio=list(spec.rrc_ratio), num_attempts=10,
    )
    s = float(spec.img_size)
    if device == "cpu" and fused_src_available():  # resize and mirror in one numba operator
        crop = square_flip_cpu(crop, spec)
        return crop if uint8_out else normalize_flip(crop, spec, layout, flip=False)
    crop = fn.resize(crop, resize_x=s, resize_y=s, **_filters(spec))
    return flip_uint8(crop, spec) if uint8_out else normalize_flip(crop, spec, layout)


@pipeline_def(enable_conditionals=True)
def _views_pipeline(read, spec: AugSpec, device: str, layout: str, uint8_out: bool, strong_source=None):
    """``strong_source``: batch index -> that batch's ``packed_params`` (the CPU graph with numba), or None."""
    jpegs, labels = read()
    if spec.recipe == "mae":
        return mae_view(jpegs, spec, device, layout, uint8_out), labels
    packed = None
    if strong_source is not None:
        packed = fn.external_source(source=strong_source, batch=True, dtype=types.FLOAT, ndim=1)
    view1, view2 = lut_views(jpegs, spec, device, layout, strong_in_graph=not uint8_out, packed=packed)
    return view1, view2, labels


# ---------------------------------------------------------------- the loader


class DaliLoader:
    """Dual-view (LUT) or single-view (MAE) batches from DALI (``contract.Loader``); see the module doc.

    ``AugSpec``: every value but ``src_padding_mode`` other than reflect (``contract.AUG_LIMITS``).
    """

    backend = "dali"

    def __init__(self, data: str | Path, options: LoaderOptions, split: str = "train", shuffle_buffer: int = 4096,
                 prefetch: int = 2):
        check_aug_support(self.backend, options.spec)
        spec, batch_size, num_workers, seed = options.spec, options.batch_size, options.num_workers, options.seed
        device, channels_last, photometric_on = options.device, options.channels_last, options.photometric_on
        rank, world_size = options.rank, options.world_size
        self.spec, self.batch_size, self.seed = spec, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.device, self.channels_last = torch.device(device), channels_last
        # On CUDA the whole graph (photometric ops included) already runs on the GPU, batched: the views
        # arrive normalised there whatever photometric_on says. On the CPU, "device" means uint8 views out
        # of DALI and view 2's ops in finish_batch, from parameters drawn per batch (strong_params.py).
        self.photometric_on = resolve_photometric_on(photometric_on, self.device)
        self.uint8_out = self.device.type != "cuda" and self.photometric_on == "device"
        self.threads, self.shuffle_buffer, self.prefetch = max(1, num_workers), shuffle_buffer, prefetch
        # DALIGenericIterator allocates each batch's torch tensors afresh: keep the freed ones for reuse
        # rather than faulting them in again (about 20 page faults per image less; pipelines/malloc.py)
        malloc.keep_freed_memory()
        if spec.recipe == "lut" and self.device.type != "cuda" and rank == 0 and not fused_src_available():
            print("lut-fast: warning: numba is not installed: DALI's CPU graph cuts the LUT views with its own "
                  "operators, about 0.6 ms per image slower (pip install numba, or the dali extra)",
                  file=sys.stderr, flush=True)
        if spec.img_size <= spec.src_padding:
            raise UserError(f"image size {spec.img_size} must exceed the SRC padding {spec.src_padding}")
        self.source = formats.detect(data, split)
        if self.source.kind == "beton":
            raise UserError(f"{self.source.path} is an FFCV file: use --backend ffcv, or give DALI the image folder "
                            "or a folder made by `lut-fast convert dali`")
        if self.source.kind == "shards":
            formats.warn_if_storage_cannot_serve(self.source.path, spec.recipe, spec.img_size, split, rank)
            manifest = read_manifest(self.source.path)
            self.num_samples = manifest["num_samples"]
            self.tars = [str(self.source.path / s["tar"]) for s in manifest["shards"]]
            self.indexes = [str(self.source.path / s["index"]) for s in manifest["shards"]]
        else:
            formats.warn_if_storage_cannot_serve(data, spec.recipe, spec.img_size, split, rank)  # `convert folder` output
            index = scan_image_folder(self.source.path, split)
            self.files = [p for p, _ in index.samples]
            self.labels = [label for _, label in index.samples]
            self.num_samples = len(self.files)
        # DALI's shard i holds samples [i*N//k, (i+1)*N//k): the smallest has N//k.
        self.batches_per_epoch = (self.num_samples // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"dataset of {self.num_samples} images is too small for batch size {batch_size} "
                            f"x {world_size} process(es)")
        self.epoch, self.start_batch = 0, 0
        self._iterator = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _reader(self, epoch_seed: int):
        shard = dict(shard_id=self.rank, num_shards=self.world_size, stick_to_shard=True, pad_last_batch=False,
                     name="reader")
        if self.source.kind == "shards":
            from lut_fast.datasets.dali_writer import IMAGE_EXT, LABEL_EXT

            return lambda: fn.readers.webdataset(
                paths=self.tars, index_paths=self.indexes, ext=[IMAGE_EXT, LABEL_EXT],
                dtypes=[types.UINT8, types.INT64], missing_component_behavior="error", random_shuffle=True,
                initial_fill=self.shuffle_buffer, seed=epoch_seed, **shard,
            )
        # Global shuffle: the same permutation on every rank (seed, epoch), then DALI's contiguous shards.
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        files = [self.files[i] for i in perm]
        labels = [self.labels[i] for i in perm]
        return lambda: fn.readers.file(files=files, labels=labels, random_shuffle=False, **shard)

    def _build(self):
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0] & 0x7FFFFFFF)
        gpu = self.device.type == "cuda"
        pipe = _views_pipeline(
            read=self._reader(epoch_seed), spec=self.spec, device="gpu" if gpu else "cpu",
            layout="HWC" if self.channels_last else "CHW", uint8_out=self.uint8_out,
            strong_source=self._strong_source(),
            batch_size=self.batch_size, num_threads=self.threads,
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None,
            seed=epoch_seed, prefetch_queue_depth=self.prefetch,
        )
        pipe.build()
        names = ["view1", "labels"] if self.spec.recipe == "mae" else ["view1", "view2", "labels"]
        # DROP: an incomplete last batch is never returned (len() counts full batches only).
        return DALIGenericIterator(pipe, names, reader_name="reader", last_batch_policy=LastBatchPolicy.DROP,
                                   auto_reset=False)

    def _batch_params(self, batch_index: int) -> torch.Tensor:
        return strong_params_for_batch(self.spec, self.batch_size, self.seed, self.epoch, self.rank, batch_index)

    def _strong_source(self):
        """The CPU graph's external source for ``strong_normalised_cpu``: batch k of this epoch -> its packed
        view-2 parameters, the parameters ``raw_batches`` hands to ``finish_batch`` for batch k when uint8
        views come out. None where DALI draws its own (the GPU graph; no numba) or there is no view 2 to
        augment in the graph (MAE; uint8 views out)."""
        from .photometric_numba import packed_params

        if self.spec.recipe != "lut" or self.device.type == "cuda" or self.uint8_out or not fused_src_available():
            return None
        return lambda batch_index: packed_params(self._batch_params(batch_index))

    def _to_torch(self, x: torch.Tensor) -> torch.Tensor:
        # HWC out of DALI (uint8 views always, float ones when channels-last) = NCHW in channels-last memory.
        return x.permute(0, 3, 1, 2) if x.dtype == torch.uint8 or self.channels_last else x

    def raw_batches(self) -> Iterator[RawBatch]:
        """The CPU side alone (see the module doc): uint8 views with photometric_on=device on the CPU,
        else float views already normalised by the graph (on the GPU with a CUDA device)."""
        self._iterator = None
        gc.collect()  # free the previous epoch's pipeline (threads, pinned/GPU memory) before building a new one
        # DALIGenericIterator allocates new tensors for every batch: nothing here is reused by DALI.
        try:
            with self._decode_errors():
                self._iterator = self._build()  # runs the first batch already
            for k in range(self.batches_per_epoch):
                with self._decode_errors():
                    out = next(self._iterator)[0]
                if k < self.start_batch:
                    continue
                view2 = self._to_torch(out["view2"]) if "view2" in out else None
                params = None
                if self.uint8_out and view2 is not None:
                    params = self._batch_params(k)
                yield RawBatch(view1=self._to_torch(out["view1"]), view2=view2,
                               labels=out["labels"].reshape(-1).to(torch.int64), strong_params=params)
        finally:
            self._iterator = None

    def __iter__(self) -> Iterator[Batch]:
        for raw in self.raw_batches():
            yield finish_batch(raw, self.spec, self.device, self.channels_last)

    def close(self) -> None:
        """Drop the epoch's pipeline (its threads and buffers); the next epoch builds a new one."""
        self._iterator = None

    @contextlib.contextmanager
    def _decode_errors(self):
        """A bad file in a plain folder stops DALI's pipeline: say how to get past it."""
        try:
            yield
        except RuntimeError as e:
            if self.source.kind == "imagefolder" and "decod" in str(e).lower():
                raise UserError(
                    f"DALI could not decode an image under {self.source.path} (its file reader cannot skip bad files): "
                    f"convert with `lut-fast convert dali {self.source.path} OUT_DIR`, which skips and reports them, "
                    "then train with --data OUT_DIR"
                ) from None
            raise
