"""The plain torch/torchvision backend: runs anywhere, no extra packages.

A DataLoader whose workers each build whole batches (``__getitems__``):

* decode once, with the fastest decoder at hand: simplejpeg when installed
  (the ``jpeg`` extra), else torchvision's ``decode_jpeg``, with Pillow for
  everything else (PNG, CMYK JPEGs, files the fast decoders refuse). All
  three are libjpeg-turbo with the same settings and give identical pixels,
  so the views do not depend on which one ran. There is no DCT-domain
  downscaling: on ImageNet-sized photos it barely pays, and it would change
  the pixels with the decoder.
* LUT: resize the shorter side to S once (skipped when the stored image is
  already that size, as in storage converted at the training size), with
  torch's uint8 antialiased bicubic (PIL's filter; 5-6x faster than Pillow's
  resize here), reflect-pad once, then each view is an S x S window of the
  padded image, mirrored with probability flip_p, copied straight into the
  batch. MAE: RandomResizedCrop (torchvision's rule) as one resize of the box.
* Batches are uint8, built whole by one worker: NHWC memory when handed
  over for the device stage (windows of the HWC image are row copies; the
  device writes the model's layout), NCHW when view 2's ops still run here
  (``DualViewDataset.channels_last_views``). Workers are threads
  of the training process by default (``workers="threads"``, config
  ``data.torch_workers``): the decoders and torch's ops release the GIL, and
  each batch is written into a ring of reused buffers (pinned on CUDA), so
  there is no inter-process hand-over and no fresh memory to fault in per
  batch. ``workers="processes"``: DataLoader worker processes writing into
  shared memory (a crashing decoder cannot take the trainer down; GIL-bound
  Pillow fallbacks scale). See ``resolve_worker_kind``.
* View 2's photometric ops (``photometric.py``, batched) run in the worker,
  on its whole batch (``photometric_on=loader``: with thread workers that
  measured cheaper than running them in the consumer, and they overlap the
  training step), or after the copy to the training device (``device``).
  Normalisation is ``batch.finish_batch``'s, except in CPU-only training with
  thread workers: there the threads write the normalised float32 views into
  a second ring of reused buffers (``_ThreadedBatches``), off the consumer's
  thread and out of fresh memory; the values are the same.
* Freed memory is kept for reuse (``malloc.keep_freed_memory``, glibc).

Randomness: every random number of sample ``i`` in epoch ``e`` is a hash of
(seed, e, i) and a draw counter (splitmix64, vectorised over the batch), so
augmentations do not depend on the number of workers, the batch a sample
lands in, the number of processes, or whether the run was resumed, and no
generator object is built per sample.
"""

from __future__ import annotations

import atexit
import io
import math
import os
import queue
import weakref
import warnings
from collections import deque
from concurrent.futures import Future
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lut_fast.errors import UserError

from . import malloc, photometric
from .batch import Batch, RawBatch, finish_batch, normalize_into, resolve_photometric_on
from .contract import LoaderOptions, check_aug_support
from .spec import AugSpec

try:  # optional: the `jpeg` extra (libjpeg-turbo, ~10 % faster than torchvision's decode_jpeg)
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

# ---------------------------------------------------------------- per-sample randomness

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1
# Draw counters (columns of ``sample_uniforms``) of each recipe.
LUT_DRAWS = {"top1": 0, "left1": 1, "flip1": 2, "top2": 3, "left2": 4, "flip2": 5}
LUT_PHOTOMETRIC = slice(6, 6 + photometric.NUM_UNIFORMS)
LUT_NUM_DRAWS = 6 + photometric.NUM_UNIFORMS
RRC_ATTEMPTS = 10
MAE_NUM_DRAWS = 2 * RRC_ATTEMPTS + 3  # (area, log ratio) per attempt, left, top, flip


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epochs, indices, count: int) -> np.ndarray:
    """(n, count) float64 uniforms in [0, 1): column j of row r is a hash of (seed, epochs[r], indices[r], j).

    A splitmix64 stream per sample, keyed by the hashed triple: statistically
    independent draws at the cost of a few integer operations, the same in
    any process, batch or order.
    """
    epochs = np.asarray(epochs, dtype=np.uint64).reshape(-1, 1)
    indices = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed & _MASK64], dtype=np.uint64) + _GOLDEN)
        key = _mix64(key ^ (epochs * np.uint64(0xD1B54A32D192ED03) + _GOLDEN))
        key = _mix64(key ^ (indices * np.uint64(0xAEF17502108EF2D9) + _GOLDEN))
        bits = _mix64(key + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _randint(u: float, n: int) -> int:
    """Uniform integer in [0, n) from a uniform in [0, 1)."""
    return min(int(u * n), n - 1)


# ---------------------------------------------------------------- decode and geometry


def _decode_jpeg(data: bytearray) -> torch.Tensor:
    if simplejpeg is not None:
        return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged file: let Pillow decide, as for the other decoders
        return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)


def read_file(path: str) -> bytearray:
    """The whole file, in a writable buffer (torchvision's decoder wants one).

    One allocation and one read where the platform has ``os.readv``: a third
    less CPU than ``bytearray(open(path, "rb").read())`` (file object, a bytes
    copy) on small stored JPEGs, where reading is 5 % of a sample's cost.
    """
    if not hasattr(os, "readv"):  # pragma: no cover - Windows
        with open(path, "rb") as f:
            return bytearray(f.read())
    fd = os.open(path, os.O_RDONLY)
    try:
        data = bytearray(os.fstat(fd).st_size)
        got = os.readv(fd, [data])
        while got < len(data):  # a short read (network file systems): the rest
            n = os.readv(fd, [memoryview(data)[got:]])
            if n == 0:  # the file shrank since fstat
                del data[got:]
                break
            got += n
        return data
    finally:
        os.close(fd)


def load_rgb(path: str) -> torch.Tensor:
    """Decode an image as uint8 RGB (3, H, W) (channels-last strides from the fast decoders)."""
    data = read_file(path)
    if data[:2] == b"\xff\xd8":  # JPEG
        try:
            return _decode_jpeg(data)
        except Exception:  # noqa: BLE001 - CMYK, progressive oddities, damage: Pillow below
            pass
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's truncated-file warnings: the caller counts failures
        with Image.open(io.BytesIO(data)) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def _batch_of_one(img: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(3, H, W) -> (1, 3, H, W); ``channels_last``: with strides that say so when the memory is HWC.

    The fast decoders give HWC memory. Told so, torch's uint8 resize reads and
    writes HWC (measured 20 % cheaper than writing planar output); a plain
    ``unsqueeze`` leaves the batch stride ambiguous and the output planar.
    """
    if channels_last:
        return img.permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)
    return img.unsqueeze(0)


def _resize(img: torch.Tensor, height: int, width: int, interpolation: str, channels_last: bool = False) -> torch.Tensor:
    """uint8 (3, h, w) -> (1, 3, height, width); bilinear/bicubic antialiased like PIL's filters.

    ``channels_last``: HWC memory in and out where the input is HWC (``_batch_of_one``); the pixels are the same.
    """
    x = _batch_of_one(img, channels_last)
    if interpolation == "nearest":
        return F.interpolate(x, size=(height, width), mode="nearest-exact")
    return F.interpolate(x, size=(height, width), mode=interpolation, antialias=True)


# aten's antialiased resizes with an ``out=`` form: the result written straight into a view of the batch
_AA_RESIZE_OUT = {"bicubic": "_upsample_bicubic2d_aa", "bilinear": "_upsample_bilinear2d_aa"}


def resize_into(img: torch.Tensor, out: torch.Tensor, interpolation: str, channels_last: bool = False) -> None:
    """``_resize`` of uint8 (3, h, w) written into ``out`` (3, H, W), a view of the batch: same pixels.

    ``F.interpolate`` returns a new tensor that then has to be copied into the batch (with a
    generic strided kernel for channels-last memory): 30-40 us per MAE crop beside its resize,
    3 % of the image's whole cost. aten's ``out=`` form writes the batch's memory directly.
    """
    op = _AA_RESIZE_OUT.get(interpolation)
    if op is None:  # nearest: no out= form worth the special case
        out.copy_(_resize(img, out.shape[1], out.shape[2], interpolation, channels_last)[0])
        return
    getattr(torch.ops.aten, op).out(_batch_of_one(img, channels_last), list(out.shape[1:]), False, None, None,
                                    out=out.unsqueeze(0))


def resize_shorter(img: torch.Tensor, size: int, interpolation: str, channels_last: bool = False) -> torch.Tensor:
    """(3, H, W) -> (1, 3, h, w) with min(h, w) == size; no resize when it already is. ``channels_last``: see ``_resize``."""
    h, w = img.shape[1:]
    if min(h, w) == size:
        return _batch_of_one(img, channels_last)
    scale = size / min(h, w)
    return _resize(img, max(size, round(h * scale)), max(size, round(w * scale)), interpolation, channels_last)


def rrc_box_from_uniforms(width: int, height: int, spec: AugSpec, u) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (left, top, w, h): torchvision's rule on ``MAE_NUM_DRAWS`` uniforms."""
    area = width * height
    log_lo, log_hi = math.log(spec.rrc_ratio[0]), math.log(spec.rrc_ratio[1])
    lo, hi = spec.rrc_scale
    for attempt in range(RRC_ATTEMPTS):
        target = area * (lo + (hi - lo) * u[2 * attempt])
        ratio = math.exp(log_lo + (log_hi - log_lo) * u[2 * attempt + 1])
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(u[2 * RRC_ATTEMPTS], width - w + 1), _randint(u[2 * RRC_ATTEMPTS + 1], height - h + 1), w, h
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(spec.rrc_ratio):
        w, h = width, int(round(width / min(spec.rrc_ratio)))
    elif in_ratio > max(spec.rrc_ratio):
        h, w = height, int(round(height * max(spec.rrc_ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def rrc_box(width: int, height: int, spec: AugSpec, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``rrc_box_from_uniforms`` with uniforms from a numpy generator (the bench's reference recipe)."""
    return rrc_box_from_uniforms(width, height, spec, rng.random(MAE_NUM_DRAWS))


def _new_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a DataLoader worker, in shared memory from the start.

    A worker's result travels to the main process through shared memory; a
    tensor allocated elsewhere would be copied there when it is sent
    (torch's default collate allocates its output the same way).
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
    except (AttributeError, RuntimeError, TypeError):  # a torch without the private helper
        return torch.empty(shape, dtype=torch.uint8).share_memory_()


# SRC padding modes (numpy's names, as torchvision's RandomCrop) -> torch's.
_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "constant": "constant"}


def pad_hwc(img: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """(H, W, C) -> (H + 2 pad, W + 2 pad, C), HWC memory, as ``F.pad`` pads (3, H, W) in ``_PAD_MODES[mode]``.

    A few slice copies: torch's reflection padding of channels-last uint8
    memory was 15x dearer than of planar memory here, and the windows are
    cheap to cut from HWC memory into NHWC batches.
    """
    h, w, c = img.shape
    out = img.new_empty((h + 2 * pad, w + 2 * pad, c))
    out[pad : pad + h, pad : pad + w] = img
    if mode == "reflect":  # mirror about the edge pixel, which is not repeated (numpy's "reflect")
        out[pad : pad + h, :pad] = img[:, 1 : pad + 1].flip(1)
        out[pad : pad + h, pad + w :] = img[:, w - pad - 1 : w - 1].flip(1)
        out[:pad] = out[pad + 1 : 2 * pad + 1].flip(0)
        out[pad + h :] = out[h - 1 : h + pad - 1].flip(0)
    elif mode == "edge":
        out[pad : pad + h, :pad] = img[:, :1]
        out[pad : pad + h, pad + w :] = img[:, w - 1 :]
        out[:pad] = out[pad : pad + 1]
        out[pad + h :] = out[pad + h - 1 : pad + h]
    else:  # constant: zeros
        out[:pad] = 0
        out[pad + h :] = 0
        out[pad : pad + h, :pad] = 0
        out[pad : pad + h, pad + w :] = 0
    return out


def _reflected(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Indices ``i`` (any integers) of an axis of length ``n`` mapped inside it as ``pad_hwc`` pads (constant: -1)."""
    if mode == "reflect":
        return np.where(i < 0, -i, np.where(i >= n, 2 * (n - 1) - i, i))
    if mode == "edge":
        return np.clip(i, 0, n - 1)
    return np.where((i < 0) | (i >= n), -1, i)


def window_into(img: np.ndarray, top: int, left: int, size: int, pad: int, mode: str, out: np.ndarray) -> None:
    """``out[:] = pad_hwc(img, pad, mode)[top : top + size, left : left + size]`` without padding the whole image.

    ``img`` (h, w, c) and ``out`` (size, size, c) are numpy views (any strides). The part of the window
    inside the image is one block copy; the few rows and columns that fall into the padding are then
    filled from pixels already in ``out`` (a reflection of the image about its edge lies inside the
    window when the window is more than twice the padding wide) with small numpy copies, which cost
    about a microsecond each where a torch op costs several. Padding the whole image first was a second
    full copy of it plus a dozen torch ops per image.
    """
    h, w = img.shape[:2]
    r0, c0 = top - pad, left - pad  # the window's first row and column in image coordinates
    lo_r, hi_r = max(0, -r0), max(0, r0 + size - h)  # rows above / below the image
    lo_c, hi_c = max(0, -c0), max(0, c0 + size - w)  # columns left / right of it
    end_r, end_c = size - hi_r, size - hi_c  # first row / column of ``out`` after the image part
    if mode == "reflect":  # every mirrored row / column must lie in the part copied from the image
        fast = all((lo == 0 or 2 * lo < end) and (hi == 0 or end - 2 - hi >= lo)
                   for lo, hi, end in ((lo_r, hi_r, end_r), (lo_c, hi_c, end_c)))
    else:
        fast = end_r > lo_r and end_c > lo_c
    if not fast:  # a window reaching past the mirrored part (tiny images): index the whole window
        rows = _reflected(np.arange(r0, r0 + size), h, mode)
        cols = _reflected(np.arange(c0, c0 + size), w, mode)
        out[...] = img[rows[:, None].clip(0), cols[None, :].clip(0)]
        if mode == "constant":
            out[(rows[:, None] < 0) | (cols[None, :] < 0)] = 0
        return
    out[lo_r:end_r, lo_c:end_c] = img[r0 + lo_r : r0 + end_r, c0 + lo_c : c0 + end_c]
    rows = slice(lo_r, end_r)
    if mode == "reflect":  # numpy's reflect: about the edge pixel, which is not repeated
        if lo_c:
            out[rows, :lo_c] = out[rows, 2 * lo_c : lo_c : -1]
        if hi_c:
            out[rows, end_c:] = out[rows, end_c - 2 : end_c - 2 - hi_c : -1]
        if lo_r:
            out[:lo_r] = out[2 * lo_r : lo_r : -1]
        if hi_r:
            out[end_r:] = out[end_r - 2 : end_r - 2 - hi_r : -1]
    elif mode == "edge":
        if lo_c:
            out[rows, :lo_c] = out[rows, lo_c : lo_c + 1]
        if hi_c:
            out[rows, end_c:] = out[rows, end_c - 1 : end_c]
        if lo_r:
            out[:lo_r] = out[lo_r : lo_r + 1]
        if hi_r:
            out[end_r:] = out[end_r - 1 : end_r]
    else:  # constant: zeros
        out[rows, :lo_c] = 0
        out[rows, end_c:] = 0
        out[:lo_r] = 0
        out[end_r:] = 0


_cv2 = None  # OpenCV, when installed (the ffcv extra brings it): ``_load_cv2``


def _load_cv2():
    """OpenCV's module, or False where it is missing or cannot load (imported on first use, not with this module)."""
    global _cv2
    if _cv2 is None:
        try:
            import cv2

            _cv2 = cv2
        except ImportError:  # not installed, or a GUI build missing its system libraries
            _cv2 = False
    return _cv2


def mirror_in_place(view: torch.Tensor, hwc: np.ndarray) -> None:
    """Mirror a view left-right in place; ``hwc``: the same memory as a (h, w, c) numpy array.

    OpenCV's flip, where installed, mirrors 3-byte pixels in place as fast as a
    plain copy (~5 us for 224 px); torch's flip of channels-last uint8 makes a
    mirrored copy in a generic strided kernel and copies it back (15-60 us):
    a flip per image on average, 5-10 % of a stored image's whole budget.
    """
    interleaved = hwc.strides[2] == hwc.itemsize and hwc.strides[1] == hwc.shape[2] * hwc.itemsize
    cv2 = _load_cv2() if interleaved else False  # planar memory: torch's flip of contiguous rows is cheap
    if cv2 and cv2.flip(hwc, 1, dst=hwc) is hwc:  # in place (OpenCV allocates instead for memory it cannot write)
        return
    view.copy_(view.flip(-1))


class DualViewDataset(torch.utils.data.Dataset):
    """Indexed by ``(epoch, index)``; ``__getitems__`` builds a whole batch (what the DataLoader calls).

    Unreadable files are replaced by the next readable one and counted. The
    sample's randomness stays that of the requested index.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], spec: AugSpec, seed: int = 0,
                 photometric_in_loader: bool = False):
        self.samples = list(samples)
        self.spec = spec
        self.seed = seed
        self.photometric_in_loader = photometric_in_loader
        if spec.recipe == "lut" and spec.img_size <= spec.src_padding:
            raise UserError(f"image size {spec.img_size} must exceed the SRC padding {spec.src_padding}")
        if spec.src_padding_mode not in _PAD_MODES:
            raise UserError(f"aug.src_padding_mode must be one of {', '.join(_PAD_MODES)}, got {spec.src_padding_mode!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, int, list[str]]:
        """Image, label and the bad files skipped to find it (the run names them at the end)."""
        bad: list[str] = []
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return load_rgb(path), label, bad
            except Exception:  # noqa: BLE001 - any decode failure means "bad file"
                bad.append(path)
        raise UserError("no readable image in the dataset")

    def __getitem__(self, key: tuple[int, int]) -> RawBatch:
        """One sample as a batch of one (the DataLoader uses ``__getitems__``)."""
        return unpack_batch(self.__getitems__([key]))

    def __getitems__(self, keys: Sequence[tuple[int, int]], views: torch.Tensor | None = None,
                     normalised: torch.Tensor | None = None) -> dict:
        """The batch of ``keys``; ``views`` (uint8, ``batch_shape(len(keys))``): where to write the views.

        ``normalised`` (float32, the same shape, any memory format): also
        normalise the views into it, and return it as the views (CPU-only
        training with thread workers; needs view 2's ops in the loader).
        """
        try:
            return self._build(keys, views, normalised)
        except UserError as e:  # sent as data: raised in the main process as a one-line error
            return {"error": str(e)}

    def batch_shape(self, n: int) -> tuple[int, ...]:
        """(views, n, 3, S, S): both views of a batch in one buffer."""
        return (2 if self.spec.recipe == "lut" else 1, n, 3, self.spec.img_size, self.spec.img_size)

    @property
    def channels_last_views(self) -> bool:
        """Whether the uint8 views are written channels-last (NHWC memory, ``batch_shape`` as the logical shape).

        The decoders give HWC images and the resize keeps that layout, so an
        NHWC window is a copy of whole pixel rows, where an NCHW one is a
        transposing copy (measured 4-10x dearer per view). Views handed over
        for the device stage are NHWC (the device converts, and writes the
        layout the model asks for); views this loader still works on (view 2's
        photometric ops, which want planar memory) stay NCHW.
        """
        return not self.photometric_in_loader

    def new_views(self, n: int, alloc=None) -> torch.Tensor:
        """An uninitialised uint8 views buffer, logical shape ``batch_shape(n)``, in this loader's layout.

        ``alloc(shape)`` makes the memory (default: ``torch.empty`` uint8).
        """
        alloc = alloc or (lambda shape: torch.empty(shape, dtype=torch.uint8))
        v, n, c, s, _ = self.batch_shape(n)
        if self.channels_last_views:
            return alloc((v, n, s, s, c)).permute(0, 1, 4, 2, 3)
        return alloc((v, n, c, s, s))

    def _compiled_windows(self, views: torch.Tensor) -> bool:
        """Whether ``src_windows`` cuts this batch's SRC views: numba installed (the ``fast`` extra),
        reflect padding (the recipe's; the kernel knows no other), and NHWC views in contiguous memory.

        Per image it replaces about 40 us of numpy and torch calls holding the GIL (window copies,
        reflected borders, a mirror, tensor-to-array views) with one call of a few microseconds that
        releases it: on images stored at the view size that was a third of what came on top of the
        decode."""
        return (self.channels_last_views and self.spec.src_padding_mode == "reflect"
                and views.permute(0, 1, 3, 4, 2).is_contiguous() and _src_kernels() is not None)

    def _build(self, keys: Sequence[tuple[int, int]], views: torch.Tensor | None = None,
               normalised: torch.Tensor | None = None) -> dict:
        spec = self.spec
        n = len(keys)
        epochs = [k[0] for k in keys]
        indices = [k[1] for k in keys]
        lut = spec.recipe == "lut"
        u = sample_uniforms(self.seed, epochs, indices, LUT_NUM_DRAWS if lut else MAE_NUM_DRAWS)
        # Both views in one buffer: one shared-memory file per batch to hand over (each costs the main
        # process a file-descriptor transfer); labels and parameters are small and travel pickled.
        if views is None:
            views = self.new_views(n, _new_batch)
        view1, view2 = views[0], (views[1] if lut else None)
        compiled = lut and self._compiled_windows(views)
        views_hwc = views.permute(0, 1, 3, 4, 2).numpy() if compiled else None  # (2, n, S, S, 3), no copy
        labels = np.empty(n, dtype=np.int64)
        bad: list[str] = []
        for i, index in enumerate(indices):
            img, labels[i], skipped = self.load(index)
            bad += skipped
            ui = u[i].tolist()
            if lut:
                self._src_views(img, ui, view1[i], view2[i], (views_hwc[0, i], views_hwc[1, i]) if compiled else None)
            else:
                left, top, w, h = rrc_box_from_uniforms(img.shape[2], img.shape[1], spec, ui)
                out = view1[i]
                resize_into(img[:, top : top + h, left : left + w], out, spec.interpolation, self.channels_last_views)
                if ui[2 * RRC_ATTEMPTS + 2] < spec.flip_p:
                    mirror_in_place(out, out.permute(1, 2, 0).numpy())
        params = None
        if lut:
            params = photometric.params_from_uniforms(spec, u[:, LUT_PHOTOMETRIC])
            if self.photometric_in_loader:
                if normalised is None:
                    photometric.apply_strong_uint8(view2, params, spec, out=view2)
                else:  # straight from the ops' rounded floats: the same values as through uint8, one pass less
                    photometric.apply_strong_normalised(view2, params, spec, normalised[1])
                params = None
        if normalised is not None:
            if params is not None:
                raise ValueError("normalised views need view 2's photometric ops in the loader")
            for a in range(0, n, photometric.CPU_CHUNK):  # a chunk's uint8 and float32 stay in cache
                normalize_into(normalised[0][a : a + photometric.CPU_CHUNK], view1[a : a + photometric.CPU_CHUNK], spec)
            views = normalised
        return {"views": views, "params": None if params is None else params.numpy(), "labels": labels, "bad": bad}

    def _src_views(self, img: torch.Tensor, u: list[float], out1: torch.Tensor, out2: torch.Tensor,
                   out_hwc: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Both SRC views of one image: one resize shared, two windows of the padded image, mirrored or not.

        Each window is cut straight from the unpadded image, into NHWC views (the device stage
        follows) or planar ones (view 2's ops follow here: numpy's transposing copy, cheaper than
        torch's padding of HWC memory into planar memory). ``out_hwc``: the two views as contiguous
        (S, S, 3) arrays, given where ``src_windows`` can cut them (``_compiled_windows``): one numba
        call with the GIL released. Otherwise ``window_into`` and ``mirror_in_place``, a dozen numpy
        calls per view. The same pixels every way.
        """
        spec, s, pad = self.spec, self.spec.img_size, self.spec.src_padding
        nhwc = self.channels_last_views  # then HWC memory throughout: resize, windows
        d = LUT_DRAWS
        if min(img.shape[1:]) == s:  # stored at the view size: no resize (nor its tensor views)
            hwc = img.permute(1, 2, 0).numpy()
        else:  # HWC memory out where the views are NHWC
            hwc = resize_shorter(img, s, spec.interpolation, channels_last=nhwc)[0].permute(1, 2, 0).numpy()
        hp, wp = hwc.shape[0] + 2 * pad, hwc.shape[1] + 2 * pad
        if out_hwc is not None and hwc.flags.c_contiguous:  # both windows in one compiled call (``_compiled_windows``)
            _src_kernels().src_views_hwc(
                out_hwc[0], out_hwc[1], hwc, pad,
                _randint(u[d["top1"]], hp - s + 1), _randint(u[d["left1"]], wp - s + 1), u[d["flip1"]] < spec.flip_p,
                _randint(u[d["top2"]], hp - s + 1), _randint(u[d["left2"]], wp - s + 1), u[d["flip2"]] < spec.flip_p)
            return
        for out, top, left, flip in ((out1, d["top1"], d["left1"], d["flip1"]), (out2, d["top2"], d["left2"], d["flip2"])):
            out_hwc = out.permute(1, 2, 0).numpy()  # NHWC views: contiguous; planar ones: a transposing copy
            window_into(hwc, _randint(u[top], hp - s + 1), _randint(u[left], wp - s + 1), s, pad,
                        spec.src_padding_mode, out_hwc)
            if u[flip] < spec.flip_p:
                mirror_in_place(out, out_hwc)


_src_windows = None  # the module once imported, False where numba is missing: ``_src_kernels``


def _src_kernels():
    """``src_windows`` when numba is installed, else None (imported on first use: numba takes a second to load)."""
    global _src_windows
    if _src_windows is None:
        try:
            from . import src_windows

            _src_windows = src_windows
        except ImportError:
            _src_windows = False
    return _src_windows or None


def unpack_batch(raw: dict) -> RawBatch:
    """``RawBatch`` from what ``DualViewDataset.__getitems__`` returns."""
    views = raw["views"]
    params = raw["params"]
    return RawBatch(view1=views[0], view2=views[1] if views.shape[0] > 1 else None,
                    labels=torch.from_numpy(raw["labels"]),
                    strong_params=None if params is None else torch.from_numpy(params), bad_images=len(raw["bad"]),
                    bad_paths=tuple(raw["bad"]))


def _whole_batch(batch: dict) -> dict:
    """The DataLoader's collate step: ``__getitems__`` already built the batch."""
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation, sharded across ranks, resumable mid-epoch.

    Like ``DistributedSampler(shuffle=True, drop_last=True)`` (the permutation
    depends only on (seed, epoch); shards are disjoint; the same number of
    batches per rank), but laid out by *global* batch: global batch b is
    ``perm[b*G:(b+1)*G]`` with G = batch_size * world_size, and rank r takes
    its positions ``r*B .. (r+1)*B``. So N processes see, batch for batch,
    exactly the samples one process with batch N*B sees (DDP == single
    process), and one process takes consecutive slices of the permutation.
    The ``n mod G`` samples left over are dropped (different ones each epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n // (batch_size * world_size)  # = (n // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"dataset of {n} images is too small for batch size {batch_size} x {world_size} process(es)"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)[: self.batches_per_epoch * self.batch_size * self.world_size]
        return perm.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.indices(self.epoch)[self.start_batch * self.batch_size :]
        return iter([(self.epoch, i) for i in idx])

    def key_batches(self, epoch: int, start_batch: int = 0) -> Iterator[list[tuple[int, int]]]:
        """This rank's batches of keys from batch ``start_batch`` of ``epoch`` on, through every later epoch: no end.

        The order within each epoch is ``__iter__``'s; a loader reading this stream can build the next
        epoch's first batches while the current one ends (``TorchLoader``'s key stream).
        """
        b = self.batch_size
        while True:
            idx = self.indices(epoch)
            for k in range(start_batch, self.batches_per_epoch):
                yield [(epoch, i) for i in idx[k * b : (k + 1) * b]]
            epoch, start_batch = epoch + 1, 0

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class _KeyStream:
    """The DataLoader's ``batch_sampler``: ``EpochSampler.key_batches`` from ``start`` (set before each ``iter``)."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler
        self.start = (0, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.sampler.key_batches(*self.start)


STOP_SIGNAL_GRACE_S = 60.0


def _worker_init(worker_id: int) -> None:
    """DataLoader workers outlive a stop signal (SIGTERM / SIGUSR1) that was meant for the trainer.

    torchrun forwards a stop signal to the training process's whole process
    group, and SLURM signals every process of a job step, so the workers get
    it too; dying at once would crash the training process before it saves
    its checkpoint. The trainer stops at its next step and ends the workers
    itself. So a signal from the training process (the DataLoader's own
    shutdown, or multiprocessing's at exit) ends the worker at once; one from
    anyone else ends it ``STOP_SIGNAL_GRACE_S`` later, if it is still there.
    """
    import os
    import signal
    import threading

    malloc.keep_freed_memory()  # a spawned worker does not inherit the parent's malloc settings
    stop = {signal.SIGTERM, signal.SIGUSR1}
    parent = os.getppid()
    armed = threading.Event()

    def exit_later() -> None:
        if not armed.is_set():
            armed.set()
            timer = threading.Timer(STOP_SIGNAL_GRACE_S, os._exit, args=(0,))
            timer.daemon = True
            timer.start()

    if not hasattr(signal, "sigwaitinfo"):  # no sender information (macOS): grace period for every signal
        for sig in stop:
            signal.signal(sig, lambda signum, frame: exit_later())
        return

    def watch() -> None:
        while True:
            info = signal.sigwaitinfo(stop)
            if info.si_pid == parent:
                os._exit(0)
            exit_later()

    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to the watcher thread only
    threading.Thread(target=watch, name="stop-signal-watch", daemon=True).start()


WORKER_KINDS = ("auto", "threads", "processes")
AUTO_THREADS_MAX = 8  # ``auto``: threads up to this many workers, processes beyond (see ``resolve_worker_kind``)


def resolve_worker_kind(kind: str, num_workers: int) -> str:
    """'threads' or 'processes': where the torch backend builds its batches.

    ``threads``: a pool of ``num_workers`` threads inside the training
    process, writing into a ring of reused (pinned, on CUDA) batch buffers.
    The decoders and torch's ops release the GIL, so the threads decode in
    parallel, and there is no inter-process hand-over: no shared-memory file
    per batch, no fresh pages to fault in. The per-sample Python between the
    ops holds the GIL (a small share of a sample's time), which caps how many
    threads can be kept busy; ``auto`` picks threads up to ``AUTO_THREADS_MAX``
    workers and processes beyond, a conservative limit (thread mode has been
    measured on small machines only).
    ``processes``: DataLoader worker processes, one batch each: a worker that
    crashes (a decoder's segfault on a hostile file) cannot take the trainer
    down, and Python-heavy work scales with cores.
    The views are the same either way (a function of seed, epoch and index).
    """
    if kind not in WORKER_KINDS:
        raise UserError(f"data.torch_workers must be one of {', '.join(WORKER_KINDS)}, got {kind!r}")
    if kind == "auto":
        return "threads" if num_workers <= AUTO_THREADS_MAX else "processes"
    return kind


class _DaemonPool:
    """``num`` daemon threads running submitted jobs (``concurrent.futures.Future`` results).

    Daemon threads, unlike ``ThreadPoolExecutor``'s, do not make the
    interpreter's exit wait for the batches queued ahead (after a stop signal
    the trainer saves and leaves without draining them). But a thread must not
    be inside a torch op when the interpreter tears torch down (the process
    aborts), so at exit every pool is closed: queued jobs are cancelled and
    the one batch each thread is building is let finish (``_close_all``).
    """

    _EMPTY = queue.Empty

    def __init__(self, num: int, name: str, torch_threads: int | None = None):
        import threading

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._torch_threads = torch_threads
        started = threading.Barrier(num + 1)
        self._threads = [threading.Thread(target=self._run, args=(started,), name=f"{name}-{i}", daemon=True)
                         for i in range(num)]
        mine = torch.get_num_threads()
        for t in self._threads:
            t.start()
        started.wait()
        if torch_threads is not None:
            # torch.set_num_threads sets the calling thread's OpenMP team size and a process-wide default
            # that threads started later take: put the default back (this thread's own size is unchanged).
            torch.set_num_threads(mine)
        _LIVE_POOLS.add(self)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        if self._stopping:
            future.cancel()
        else:
            self._jobs.put((future, fn, args))
        return future

    def _run(self, started) -> None:
        if self._torch_threads is not None:
            torch.get_num_threads()  # torch's per-thread lazy set-up first, or it would undo the next line later
            torch.set_num_threads(self._torch_threads)
        started.wait()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if self._stopping:
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer by future.result()
                future.set_exception(e)

    def close(self, join_s: float | None = None) -> None:
        """Cancel what is queued, let each thread finish its job and end (waiting ``join_s`` for it).

        The pool stays in ``_LIVE_POOLS`` until its threads have ended: a loader
        closed without waiting (leaving an epoch early) may still have a thread
        inside a torch op, and the exit must wait for it (``_close_all``).
        """
        if not self._stopping:
            self._stopping = True
            while True:
                try:
                    job = self._jobs.get_nowait()
                except self._EMPTY:
                    break
                if job is not None:
                    job[0].cancel()
            for _ in self._threads:
                self._jobs.put(None)
        if join_s is not None:
            for t in self._threads:
                t.join(join_s)
        live = _LIVE_POOLS  # None once the interpreter has torn this module down (a __del__ at exit)
        if live is not None and not any(t.is_alive() for t in self._threads):
            live.discard(self)


_LIVE_POOLS: "weakref.WeakSet[_DaemonPool]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close(join_s=60.0)


def _storage_use_count(t: torch.Tensor) -> int:
    """How many tensors (and storage objects) share ``t``'s memory; -1 where torch cannot say (never equal)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:  # pragma: no cover - every torch this project supports has it
        return -1
    return count(t.untyped_storage()._cdata)


class _ThreadedBatches:
    """Batches built by a pool of threads into a ring of reused buffers (``resolve_worker_kind``).

    Batch k of the loader's life is written into buffer ``k % depth`` with
    ``depth = ahead + 2``: when batch k is requested, batch ``k + ahead`` is
    queued into the buffer of batch ``k - 2``. So a ``RawBatch`` stays valid
    until the consumer asks for the batch after the next one (``finish_batch``
    copies long before: the trainer is safe; a consumer that keeps raw batches
    longer must clone them). On CUDA the buffers are pinned and, when the
    consumer asks for the next batch, an event is recorded on the current
    stream for the one it had: its non-blocking copies to the device were
    queued before that point, and the thread that next writes into that buffer
    waits for the event first.

    ``normalise`` (CPU-only training: the views stay on the CPU and view 2's
    ops run here): the threads also write the normalised float32 views, in
    ``channels_last`` memory if asked, into a second ring, so the consumer
    gets finished batches. That moves the normalisation off the consumer's
    thread (where an OpenMP team of its own spin-waited against the loader
    threads) and out of fresh memory: a float32 batch is 38 MB at 32 x 224 px,
    which the allocator hands back to the OS and faults in afresh each time.
    These float views are handed out as they are, and the consumer may keep
    them: a float buffer still referenced when its slot comes round again is
    left to its holder and replaced by a new one (``_float_buffer``).
    """

    def __init__(self, dataset: DualViewDataset, batch_size: int, num_threads: int, device: torch.device,
                 normalise: bool = False, channels_last: bool = False):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.normalise, self.channels_last = normalise, channels_last
        self.pin = device.type == "cuda"
        self.num_threads = num_threads
        self.ahead = 2 * num_threads  # queued batches: every thread busy, one batch each in reserve
        self.depth = self.ahead + 2
        self.buffers: list[torch.Tensor | None] = [None] * self.depth
        self.float_buffers: list[torch.Tensor | None] = [None] * self.depth
        self.float_holders = [0] * self.depth  # each float buffer's storage use count while only the ring holds it
        self.events: list = [None] * self.depth
        self.made = 0  # batches started so far (across epochs: the slot numbering continues)
        self.pool: _DaemonPool | None = None
        # One intra-op thread per loader thread, as in DataLoader workers: the pool is the parallelism, and
        # an OpenMP team per loader thread oversubscribed the cores and spin-waited (5-10 % more CPU per image).
        self.torch_threads: int | None = 1

    def _buffer(self, slot: int) -> torch.Tensor:
        if self.buffers[slot] is None:
            self.buffers[slot] = self.dataset.new_views(
                self.batch_size, lambda shape: torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin))
        return self.buffers[slot]

    def _float_buffer(self, slot: int) -> torch.Tensor:
        """The slot's float32 buffer; a new one if the consumer still holds (a view of) the batch last made in it."""
        buf = self.float_buffers[slot]
        # (a use count of -1: torch cannot tell, so never reuse)
        if buf is None or self.float_holders[slot] < 0 or _storage_use_count(buf) != self.float_holders[slot]:
            views, n, c, s, _ = self.dataset.batch_shape(self.batch_size)
            if self.channels_last:
                buf = torch.empty((views, n, s, s, c), dtype=torch.float32).permute(0, 1, 4, 2, 3)
            else:
                buf = torch.empty((views, n, c, s, s), dtype=torch.float32)
            self.float_buffers[slot] = buf
            self.float_holders[slot] = _storage_use_count(buf)
        return buf

    def _job(self, keys: list, slot: int, event, normalise: bool) -> dict:
        if event is not None:
            event.synchronize()  # the device copies out of this buffer are done
        return self.dataset.__getitems__(keys, self._buffer(slot), self._float_buffer(slot) if normalise else None)

    def batches(self, groups: Iterable[list], normalise: bool = False) -> Iterator[dict]:
        """The batches of ``groups`` (lists of keys; the stream may be endless), in order, ``self.ahead`` of
        them under way; ``normalise``: with float32 normalised views (needs ``self.normalise``)."""
        normalise = normalise and self.normalise
        if self.pool is None:
            self.pool = _DaemonPool(self.num_threads, "lut-fast-loader", self.torch_threads)
        groups = iter(groups)
        pending: deque[tuple[Future, int]] = deque()

        def queue_next() -> None:
            keys = next(groups, None)
            if keys is None:
                return
            slot = self.made % self.depth
            self.made += 1
            pending.append((self.pool.submit(self._job, keys, slot, self.events[slot], normalise), slot))

        try:
            for _ in range(self.ahead):
                queue_next()
            while pending:
                queue_next()  # batch k + ahead goes into the buffer of batch k - 2 (see the class doc)
                future, slot = pending.popleft()
                yield future.result()
                if self.pin:  # the consumer is back for more: its copies out of this buffer are queued
                    self.events[slot] = torch.cuda.Event()
                    self.events[slot].record(torch.cuda.current_stream(self.device))
        finally:
            # Left with batches under way (stop signal, error, break, a new stream): nothing may still
            # write into the ring when the next stream starts writing into it.
            # (Method calls only: this also runs when the generator is collected at interpreter exit,
            # when module globals may be gone.)
            for future, _ in pending:
                if not future.cancel():  # running (or done): wait for it
                    future.exception()
            # Those batches are dropped: the numbering goes on from the last one handed out, so the next
            # stream's first batches keep off the two buffers the consumer may still hold.
            self.made -= len(pending)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class TorchLoader:
    """Dual-view loader yielding ``Batch`` on ``device``; batches built by threads or processes (``contract.Loader``).

    Honours every ``AugSpec`` value (``contract.AUG_LIMITS``). ``workers``: ``threads`` | ``processes`` |
    ``auto`` (``resolve_worker_kind``); ``num_workers=0`` builds every batch in the calling thread.
    """

    backend = "torch"

    def __init__(self, samples: Sequence[tuple[str, int]], options: LoaderOptions, workers: str = "auto"):
        check_aug_support(self.backend, options.spec)
        spec, batch_size, num_workers, seed = options.spec, options.batch_size, options.num_workers, options.seed
        device, channels_last, photometric_on = options.device, options.channels_last, options.photometric_on
        rank, world_size = options.rank, options.world_size
        self.spec, self.device, self.channels_last = spec, torch.device(device), channels_last
        self.photometric_on = resolve_photometric_on(photometric_on, self.device)
        self.workers = resolve_worker_kind(workers, num_workers) if num_workers > 0 else "main"
        malloc.keep_freed_memory()  # the per-image temporaries are reused, not faulted in afresh
        self.dataset = DualViewDataset(samples, spec, seed, photometric_in_loader=self.photometric_on == "loader")
        self.sampler = EpochSampler(len(samples), batch_size, seed, rank, world_size)
        self.batch_size = batch_size
        self.threaded = None
        self.loader = None
        # The batches come from one stream of keys that runs on across epoch boundaries, so the next epoch's
        # first batches are under way while this one ends (without it, each epoch began with the wait for
        # one worker to build a whole batch alone: 0.6 s per epoch for 256 images, measured on an H200 host).
        # ``_stream_at`` is the (epoch, batch) the stream yields next; an epoch that starts anywhere else
        # (resume, a repeated epoch, another sampler position) starts a new stream there.
        self._stream: Iterator[dict] | None = None
        self._stream_at: tuple[int, int] | None = None
        self._stream_normalised = False
        if self.workers == "threads":
            # CPU-only training: the threads deliver finished (normalised) views too (``_ThreadedBatches``).
            normalise = self.device.type == "cpu" and self.photometric_on == "loader"
            self.threaded = _ThreadedBatches(self.dataset, batch_size, num_workers, self.device, normalise=normalise,
                                             channels_last=channels_last)
            self.prefetch = self.threaded.ahead  # batches made ahead of the consumer (bench's untimed drain)
            return
        self.key_stream = _KeyStream(self.sampler)  # whole batches only: the last-batch policy is drop
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.key_stream,
            num_workers=num_workers,
            collate_fn=_whole_batch,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            # Its own generator: every iter() draws the workers' seeds from it, and those draws must not
            # come from the global RNG, which the trainer's own randomness (mixup, erasing) uses: a new
            # key stream (resume) would otherwise shift that. The views never use these seeds.
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=_worker_init,
            # Batches in flight live in shared memory (77 MB each for LUT at 256 x 224 px): 4 per worker on
            # small machines, 2 each where there are many workers (a GPU node's default), still several
            # times what the consumer needs while a worker builds its next batch.
            prefetch_factor=(4 if num_workers <= AUTO_THREADS_MAX else 2) if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def raw_batches(self) -> Iterator[RawBatch]:
        """The CPU side alone: uint8 views (and view 2's parameters when its ops are left to the device).

        With thread workers the views live in reused buffers: valid until the
        batch after the next one is requested (``_ThreadedBatches``).
        """
        return self._raw_batches(normalised=False)

    def _raw_batches(self, normalised: bool) -> Iterator[RawBatch]:
        """``raw_batches``; ``normalised``: float32 views already normalised where the loader threads can do it."""
        epoch, b = self.sampler.epoch, self.sampler.start_batch
        if self._stream is None or self._stream_at != (epoch, b) or self._stream_normalised != normalised:
            self._close_stream()
            if self.threaded is None:
                self.key_stream.start = (epoch, b)
                self._stream = iter(self.loader)
            else:
                self._stream = self.threaded.batches(self.sampler.key_batches(epoch, b), normalise=normalised)
            self._stream_at, self._stream_normalised = (epoch, b), normalised
        while b < self.sampler.batches_per_epoch:
            try:
                raw = next(self._stream)
            except BaseException:
                self._close_stream()
                raise
            b += 1
            self._stream_at = (epoch, b) if b < self.sampler.batches_per_epoch else (epoch + 1, 0)
            if "error" in raw:  # raised while building (e.g. no readable image): one line, from here
                self._close_stream()
                raise UserError(raw["error"])
            yield unpack_batch(raw)

    def _close_stream(self) -> None:
        """End the key stream; with thread workers, once this returns no job writes into the ring."""
        stream, self._stream, self._stream_at = self._stream, None, None
        if stream is not None and self.threaded is not None:
            stream.close()

    def __iter__(self) -> Iterator[Batch]:
        for raw in self._raw_batches(normalised=True):
            yield finish_batch(raw, self.spec, self.device, self.channels_last)

    def close(self) -> None:
        """Stop the loader threads (they are daemons: the process may also just exit)."""
        if getattr(self, "_stream", None) is not None:
            self._close_stream()
        if getattr(self, "threaded", None) is not None:
            self.threaded.close()

    def __del__(self) -> None:
        self.close()
