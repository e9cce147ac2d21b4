"""View 2's photometric augmentations as batched tensor ops, on any device.

One implementation, used in two places: in the torch backend's data workers
(on CPU, per batch, ``photometric_on=loader``) and after the copy to the
training device (``batch.finish_batch``, ``photometric_on=device``) for every
backend that hands over uint8 views. Every op takes per-sample parameters,
so a batch is processed in a handful of vectorised calls and the result does
not depend on which other images share the batch. In the CPU loader, where
numba is installed, ``photometric_numba`` runs these same definitions in one
compiled pass per image (pinned against this module by the tests).

What the ops are (every number from ``AugSpec``):

* Color jitter, with probability ``jitter_p``: brightness b and contrast c
  uniform in [1-s, 1+s], saturation f likewise, hue h uniform in [-hue, hue]
  (a fraction of a full turn). All four are linear maps of the pixel's RGB
  colour, so they are composed into one 3x3 matrix and one offset per image
  and applied in a single pass (``jitter_matrix``, ``apply_colour``):

  - brightness: ``b * x``;
  - contrast: ``c * x + (1 - c) * mean luma of the image`` (the mean of a
    linear function of the pixels is the same function of the mean colour,
    so this is affine too, with a per-image offset);
  - saturation: ``f * x + (1 - f) * luma(x)`` (torchvision's blend with the
    grayscale image);
  - hue: a rotation of the chroma plane of YIQ about the gray axis by
    ``-2 pi h`` (the linear hue model of DALI's ``fn.hsv``; positive h turns
    red towards green, as HSV's hue does).

  In YIQ coordinates these are diagonal or block-diagonal maps that keep the
  gray axis, so they commute: the random op order of torchvision's
  ColorJitter makes no difference and is not drawn. The composed map is
  ``y = b c H S x + b (1 - c) Y(mean x) (1, 1, 1)``.

  Where this departs from torchvision's ColorJitter, deliberately, for speed:
  the hue step is the YIQ rotation, not an HSV round trip (it keeps each
  pixel's luma where HSV keeps its maximum channel; the two agree on grays
  and differ by a few levels on saturated colours), and values are clamped to
  the valid range once, after the composed map, instead of after every op (so
  highlights first pushed past white by one factor and then pulled back by
  another keep their detail here, where torchvision flattens them). The
  per-op functions below (``adjust_*``) are the one-op-at-a-time definitions
  with torchvision's clamping; the tests pin the composed map against them.
* Then exactly one of ``spec.strong_ops`` per image (DeiT-III's 3-augment):
  grayscale (ITU-R 601-2 luma in all three channels), solarize (values at or
  above ``solarize_threshold`` on the 0..255 scale are inverted, PIL's rule
  on the rounded value), or a Gaussian blur with sigma uniform in
  ``blur_sigma``, separable, reflect padding, over a window of
  2 * ceil(3 sigma) + 1 pixels for that image (as DALI sizes it; the weights
  left out hold 0.3 % of the mass).

Images are float (B, 3, H, W), any memory format, with values in
[0, value_range]: 1 for [0, 1] images, 255 for the loaders' uint8 scale (no
rescaling passes then). The parameters are a (B, NUM_PARAMS) float tensor on
the CPU (``sample_params`` or ``params_from_uniforms``), columns below.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .batch import device_constant, to_device
from .spec import STRONG_OPS, AugSpec

# Column layout of the per-sample parameter tensor (B, NUM_PARAMS).
JITTER_ON = 0  # 1.0: apply the color jitter
BRIGHTNESS, CONTRAST, SATURATION = 1, 2, 3  # factors (1 = unchanged)
HUE = 4  # fraction of a full turn in [-spec.hue, spec.hue] (0 = unchanged)
STRONG_OP = 5  # index into STRONG_OPS; -1 = none (tests)
BLUR_SIGMA = 6  # pixels
NUM_PARAMS = 7
NUM_UNIFORMS = 7  # uniforms in [0, 1) that ``params_from_uniforms`` reads per sample

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L") and torchvision
# RGB -> YIQ (FCC NTSC). Row 0 is the luma; rows 1 and 2 sum to zero, so grays have no chroma.
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


# ---------------------------------------------------------------- parameters


def params_from_uniforms(spec: AugSpec, u: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(n, NUM_PARAMS) parameters from (n, NUM_UNIFORMS) independent uniforms in [0, 1).

    The loaders derive the uniforms per sample (the torch backend from a hash
    of (seed, epoch, index)); ``sample_params`` from a torch generator.
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    n = u.shape[0]
    p = torch.zeros(n, NUM_PARAMS, dtype=torch.float64)
    p[:, JITTER_ON] = (u[:, 0] < spec.jitter_p).double()
    for col, strength in ((BRIGHTNESS, spec.brightness), (CONTRAST, spec.contrast), (SATURATION, spec.saturation)):
        lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
        p[:, col] = lo + (hi - lo) * u[:, col]
    p[:, HUE] = (2 * u[:, 4] - 1) * spec.hue
    allowed = torch.tensor([STRONG_OPS.index(op) for op in spec.strong_ops], dtype=torch.float64)
    pick = (u[:, 5] * len(allowed)).long().clamp_(max=len(allowed) - 1)
    p[:, STRONG_OP] = allowed[pick]
    lo, hi = spec.blur_sigma
    p[:, BLUR_SIGMA] = lo + (hi - lo) * u[:, 6]
    return p.float()


def sample_params(spec: AugSpec, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the target-view parameters of ``n`` images (CPU float tensor) from ``generator``."""
    return params_from_uniforms(spec, torch.rand(n, NUM_UNIFORMS, generator=generator, dtype=torch.float64))


# ---------------------------------------------------------------- the ops one at a time (definitions)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) ITU-R 601-2 luma of (B, 3, H, W)."""
    w = device_constant(LUMA, x.dtype, x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, kept as 3 identical channels (B, 3, H, W) (an expanded view)."""
    n, _, h, w = x.shape
    weights = device_constant(LUMA, x.dtype, x.device).view(1, 1, 3).expand(n, 1, 3)
    return torch.bmm(weights, x.reshape(n, 3, h * w)).view(n, 1, h, w).expand(-1, 3, -1, -1)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return to_device(v, x.device, x.dtype).view(-1, 1, 1, 1)


def _clamped(x: torch.Tensor, clamp: bool, value_range: float) -> torch.Tensor:
    return x.clamp_(0, value_range) if clamp else x


def adjust_brightness(x, f, clamp: bool = True, value_range: float = 1.0):
    return _clamped(x * _per_sample(f, x), clamp, value_range)


def adjust_contrast(x, f, clamp: bool = True, value_range: float = 1.0):
    mean = luma(x).mean(dim=(2, 3), keepdim=True)
    f = _per_sample(f, x)
    return _clamped(f * x + (1 - f) * mean, clamp, value_range)


def adjust_saturation(x, f, clamp: bool = True, value_range: float = 1.0):
    f = _per_sample(f, x)
    return _clamped(f * x + (1 - f) * luma(x), clamp, value_range)


def _yiq_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The RGB -> RGB maps whose sum ``LUMA + s cos(t) COS + s sin(t) SIN`` keeps Y and turns I/Q by -t, scaled by s."""
    yiq = np.array(RGB_TO_YIQ, dtype=np.float64)
    inv = np.linalg.inv(yiq)
    keep_y = np.diag([1.0, 0.0, 0.0])
    cos_part = np.diag([0.0, 1.0, 1.0])
    sin_part = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    return inv @ keep_y @ yiq, inv @ cos_part @ yiq, inv @ sin_part @ yiq


_MAP_LUMA, _MAP_COS, _MAP_SIN = _yiq_maps()


def _chroma_map(hue: np.ndarray, saturation: np.ndarray | float) -> np.ndarray:
    """(B, 3, 3) RGB -> RGB maps (float64): keep luma, scale I/Q by ``saturation``, rotate them by -2 pi ``hue``.

    numpy on purpose: these are a few hundred numbers per batch, computed on the host next to the
    training step, and torch's small batched matmuls wake its intra-op thread pool (whose threads
    then spin, measured at 7-8x the single-thread time on 2 cores, and many cores' worth on a GPU host).
    """
    theta = 2 * math.pi * np.asarray(hue, dtype=np.float64)
    cos, sin = np.cos(theta) * saturation, np.sin(theta) * saturation
    return _MAP_LUMA + cos[:, None, None] * _MAP_COS + sin[:, None, None] * _MAP_SIN


def hue_matrix(hue: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) RGB -> RGB hue rotation (float64): positive ``hue`` turns red towards green."""
    return torch.from_numpy(_chroma_map(hue.double().cpu().numpy().reshape(-1), 1.0))


def _apply_matrix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bij,bjhw->bihw", to_device(m, x.device, x.dtype), x)


def adjust_hue(x, f, clamp: bool = True, value_range: float = 1.0):
    """Rotate the chroma plane of YIQ about the gray axis by ``f`` of a full turn (luma unchanged)."""
    return _clamped(_apply_matrix(x, hue_matrix(torch.as_tensor(f).reshape(-1))), clamp, value_range)


def solarize(x: torch.Tensor, threshold: int, value_range: float = 1.0) -> torch.Tensor:
    """Invert values at or above ``threshold`` on the 0..255 scale (PIL's ImageOps.solarize after rounding).

    Written as x + step * (range - 2x) with step = clamp(sign(x - t) + 1, max=1)
    (1 from the threshold up): on a CPU, torch.where on a boolean mask was 3-4x slower.
    """
    step = torch.sign(x - (threshold - 0.5) * (value_range / 255.0)).add_(1).clamp_(max=1)
    return x.addcmul(step, x.mul(-2).add_(value_range))


def blur_window(sigma: torch.Tensor) -> torch.Tensor:
    """Odd window 2 * ceil(3 sigma) + 1 per sigma (int64)."""
    return 2 * torch.ceil(3.0 * sigma.double()).long() + 1


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image, reflect padding.

    ``kernel_size=None``: each image over its own window ``blur_window(sigma)``;
    an int: every image over that window. On a CPU, image by image as sums of
    shifted slices (``_blur_shifted``); elsewhere one grouped convolution for
    the batch (the taps beyond an image's window have weight 0).
    """
    k, halves = gaussian_taps(sigma, kernel_size)
    if x.device.type == "cpu":
        return _blur_shifted(x, k, halves.tolist())
    return _blur_grouped_conv(x, k)


def gaussian_taps(sigma: torch.Tensor, kernel_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's normalised Gaussian weights (n, 2 * half + 1), float64, centred, and its own half-window (n,).

    ``kernel_size=None``: image i's window is ``blur_window(sigma[i])`` (the taps beyond it are 0, the
    row is as wide as the widest window); an int: every image over that window.
    """
    sigma = sigma.to(dtype=torch.float64).view(-1, 1).cpu()
    if kernel_size is None:
        halves = blur_window(sigma.view(-1)) // 2
        half = int(halves.max()) if halves.numel() else 0
    else:
        half = kernel_size // 2
        halves = torch.full((sigma.shape[0],), half, dtype=torch.long)
    coords = torch.arange(-half, half + 1, dtype=torch.float64).view(1, -1)
    k = torch.exp(-(coords**2) / (2 * sigma**2)) * (coords.abs() <= halves.view(-1, 1))
    return k / k.sum(dim=1, keepdim=True), halves


def _blur_grouped_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """GPU blur: the whole batch in two grouped convolutions (k: (n, 2*half+1) taps per image)."""
    n, c, h, w = x.shape
    size = k.shape[1]
    half = size // 2
    k = to_device(k, x.device, x.dtype).repeat_interleave(c, dim=0)  # (n*c, size)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), k.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), k.view(n * c, 1, size, 1), groups=n * c)
    return y.view(n, c, h, w)


def _blur_shifted(x: torch.Tensor, k: torch.Tensor, halves: list[int]) -> torch.Tensor:
    """CPU blur: per image and axis, ``w0 x + sum_d w_d (x[+d] + x[-d])`` over that image's window.

    Vectorised adds of shifted views with scalar weights: 2.5x cheaper than
    oneDNN's grouped convolution with per-image kernels here, and each image
    pays only for its own window (a small sigma's 3 taps, not the batch's 13).
    """
    n = x.shape[0]
    h, w = x.shape[2:]
    out = torch.empty(x.shape, dtype=x.dtype)
    centre = (k.shape[1] - 1) // 2
    for i in range(n):
        half = int(halves[i])
        weights = k[i, centre - half : centre + half + 1].tolist()
        y = x[i : i + 1]
        for dim, size, pad in ((3, w, (half, half, 0, 0)), (2, h, (0, 0, half, half))):
            p = F.pad(y, pad, mode="reflect") if half else y
            acc = p.narrow(dim, half, size) * weights[half]
            pair = torch.empty_like(acc)
            for d in range(1, half + 1):
                torch.add(p.narrow(dim, half - d, size), p.narrow(dim, half + d, size), out=pair)
                acc.add_(pair, alpha=weights[half + d])
            y = acc
        out[i : i + 1] = y
    return out


# ---------------------------------------------------------------- the composed, batched pipeline


def jitter_matrix(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The color jitter of each image as ``y = M x + k * Y(mean x) * (1, 1, 1)`` (float64, CPU).

    Returns M (B, 3, 3) and k (B,): the offset's weight on the image's mean
    luma (the contrast's centre), known before the image is. Images whose
    JITTER_ON is 0 get M = identity, k = 0.
    """
    p = params.detach().double().cpu().numpy()  # host math in numpy: see ``_chroma_map``
    on = p[:, JITTER_ON] > 0.5
    b = np.where(on, p[:, BRIGHTNESS], 1.0)
    c = np.where(on, p[:, CONTRAST], 1.0)
    s = np.where(on, p[:, SATURATION], 1.0)
    h = np.where(on, p[:, HUE], 0.0)
    m = (b * c)[:, None, None] * _chroma_map(h, s)
    return torch.from_numpy(m), torch.from_numpy(b * (1 - c))


def jitter_offset(k: torch.Tensor, mean_rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3) offset t of the composed jitter from k (``jitter_matrix``) and each image's mean colour (B, 3)."""
    w = device_constant(LUMA, mean_rgb.dtype, mean_rgb.device)
    return (to_device(k, mean_rgb.device, mean_rgb.dtype) * (mean_rgb @ w)).view(-1, 1).expand(-1, 3)


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """(B, 3) per-image mean of (B, 3, H, W), any memory format."""
    return x.mean(dim=(2, 3))


def apply_colour(x: torch.Tensor, m: torch.Tensor, t: torch.Tensor, value_range: float) -> torch.Tensor:
    """``clamp(M x + t)`` per image in one batched matmul (new NCHW-contiguous tensor).

    (B, 3, 3) @ (B, 3, H*W) on planar memory: on a CPU the same product on
    NHWC memory, (B, H*W, 3) @ (B, 3, 3), was 4-5x slower.
    """
    n, _, h, w = x.shape
    m = to_device(m, x.device, x.dtype)
    t = to_device(t, x.device, x.dtype).reshape(n, 3, 1)
    y = torch.baddbmm(t, m, x.contiguous().view(n, 3, h * w)).view(n, 3, h, w)
    return y.clamp_(0, value_range)


def _on_subset(x: torch.Tensor, index: torch.Tensor, op) -> None:
    """x[index] = op(x[index]) in place (index: CPU int64).

    On a CPU one image at a time through views (gathering the images and
    scattering them back cost more than the ops); elsewhere batched.
    """
    if index.numel() == 0:
        return
    if x.device.type == "cpu":
        for i in index.tolist():
            x[i : i + 1] = op(x[i : i + 1])
        return
    on_device = to_device(index, x.device)
    x.index_copy_(0, on_device, op(x.index_select(0, on_device)).to(x.dtype))


def apply_strong_(x: torch.Tensor, params: torch.Tensor, spec: AugSpec, value_range: float = 1.0) -> torch.Tensor:
    """Color jitter (where JITTER_ON) then each image's 3-augment op; may reuse ``x``'s storage.

    ``x`` float (B, 3, H, W) in [0, value_range]; returns the result (use it, not ``x``).
    """
    params = params.detach().cpu().float()  # selections on the CPU: no device syncs
    if bool((params[:, JITTER_ON] > 0.5).any()):
        m, k = jitter_matrix(params)
        x = apply_colour(x, m, jitter_offset(k, mean_colour(x)), value_range)
    op = params[:, STRONG_OP].long()

    def select(name: str) -> torch.Tensor:
        return torch.nonzero(op == STRONG_OPS.index(name)).view(-1)

    _on_subset(x, select("grayscale"), grayscale)
    _on_subset(x, select("solarize"), lambda v: solarize(v, spec.solarize_threshold, value_range))
    # The blur stays batched on every device: per image, the convolutions' fixed costs dominate.
    blurred = select("blur")
    if blurred.numel():
        on_device = to_device(blurred, x.device)
        sigma = params[blurred, BLUR_SIGMA]
        x.index_copy_(0, on_device, gaussian_blur(x.index_select(0, on_device), sigma))
    return x


def apply_strong(x: torch.Tensor, params: torch.Tensor, spec: AugSpec, value_range: float = 1.0) -> torch.Tensor:
    """``apply_strong_`` on a copy: ``x`` (float, [0, value_range]) is left as it is."""
    return apply_strong_(x.clone(), params, spec, value_range)


CPU_CHUNK = 8  # images per pass of ``apply_strong_uint8`` on a CPU


def apply_strong_uint8(x: torch.Tensor, params: torch.Tensor, spec: AugSpec,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 in, uint8 out (rounded), computed on the 0..255 scale.

    ``out`` (uint8, may be ``x`` itself) receives the result: the rounding
    and the conversion back to uint8 are then one pass. On a CPU the batch
    goes through ``CPU_CHUNK`` images at a time (``apply_strong_rounded``).
    """
    if out is None:
        out = torch.empty_like(x)

    def write(start: int, stop: int, y: torch.Tensor) -> None:
        out[start:stop].copy_(y)

    apply_strong_rounded(x, params, spec, write)
    return out


def apply_strong_rounded(x: torch.Tensor, params: torch.Tensor, spec: AugSpec, write) -> None:
    """The ops on uint8 ``x`` (0..255), rounded; ``write(start, stop, y)`` receives images start..stop-1.

    ``y`` is float, whole numbers in [0, 255] (what the uint8 result would
    hold), valid only during the call: the caller converts it (to uint8, or
    normalised float in the CPU-only loader, with no uint8 round trip). On a
    CPU the batch goes through ``CPU_CHUNK`` images at a time: every float
    temporary is then a few MB, which the allocator hands back for reuse,
    where a whole batch's (20 MB at 32 x 224 px) is returned to the OS and
    faulted in afresh each time; that, and the passes staying in cache, made
    the ops ~1.5x cheaper. Each image's result is the same either way (the
    ops are per image).
    """
    on_cpu = x.device.type == "cpu"
    compiled = on_cpu and x.dtype == torch.uint8 and _numba_kernels() is not None
    step = CPU_CHUNK if on_cpu else x.shape[0]
    chunk = torch.empty((min(step, x.shape[0]), *x.shape[1:]), dtype=torch.float32) if compiled else None
    for i in range(0, x.shape[0], step):
        stop = min(i + step, x.shape[0])
        if compiled:  # the same ops in one compiled pass per image (photometric_numba.py)
            y = chunk[: stop - i]
            _numba_kernels().strong_rounded(x[i:stop], params[i:stop], spec, y)
        else:
            y = apply_strong_(x[i:stop].float(), params[i:stop], spec, value_range=255.0).round_()
        write(i, stop, y)


def apply_strong_normalised(x: torch.Tensor, params: torch.Tensor, spec: AugSpec, out: torch.Tensor) -> None:
    """The ops on uint8 CPU ``x``, rounded, then normalised into float32 ``out`` as ``batch.normalize_into`` does
    (the CPU-only loader's view 2); with numba, one compiled pass per image straight into ``out``."""
    kernels = _numba_kernels()
    if kernels is not None and x.device.type == "cpu" and x.dtype == torch.uint8:
        kernels.strong_rounded(x, params, spec, out, normalise=True)
        return
    from .batch import normalize_into

    apply_strong_rounded(x, params, spec, lambda a, b, y: normalize_into(out[a:b], y, spec))


def _numba_kernels():
    """``photometric_numba`` when numba is installed (the ``fast`` extra), else None: the torch ops run instead."""
    global _NUMBA
    if _NUMBA is False:
        try:
            from . import photometric_numba
        except ImportError:
            photometric_numba = None
        _NUMBA = photometric_numba
    return _NUMBA


_NUMBA = False  # not looked up yet
