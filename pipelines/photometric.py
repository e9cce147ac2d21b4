"""The target view's photometric augmentations as batched tensor ops.

One implementation for the torch backend, used in two places: in the data
workers (on CPU, per batch) or on the training device after the copy
(``--photometric-on device``, the GPU path). Every op takes per-sample
parameters, so a batch is processed in a handful of vectorised calls and the
result does not depend on which other images share the batch.

Semantics follow torchvision's ColorJitter (random order of the four ops,
factors uniform in [1-s, 1+s], hue in [-h, h]) and DeiT-III's 3-augment
(grayscale, solarize at 128/255, PIL-style Gaussian blur with sigma ~ U(0.1, 2)).
Images are float in [0, 1], shape (B, 3, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import STRONG_OPS, AugSpec

# Column layout of the per-sample parameter tensor (B, NUM_PARAMS).
JITTER_ON, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # permutation of the four jitter ops (0=b, 1=c, 2=s, 3=h)
STRONG_OP = 9  # index into STRONG_OPS
BLUR_SIGMA = 10
NUM_PARAMS = 11


def sample_params(spec: AugSpec, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the target-view parameters of ``n`` images (CPU float tensor)."""
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    p = torch.zeros(n, NUM_PARAMS)
    p[:, JITTER_ON] = (u(n) < spec.jitter_p).float()
    for col, strength in ((BRIGHTNESS, spec.brightness), (CONTRAST, spec.contrast), (SATURATION, spec.saturation)):
        lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
        p[:, col] = lo + (hi - lo) * u(n)
    p[:, HUE] = (2 * u(n) - 1) * spec.hue
    p[:, ORDER] = torch.argsort(u(n, 4), dim=1).float()
    allowed = torch.tensor([STRONG_OPS.index(op) for op in spec.strong_ops], dtype=torch.float)
    p[:, STRONG_OP] = allowed[torch.randint(len(allowed), (n,), generator=generator)]
    lo, hi = spec.blur_sigma
    p[:, BLUR_SIGMA] = lo + (hi - lo) * u(n)
    return p


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, kept as 3 identical channels (B, 3, H, W)."""
    y = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return y.expand(-1, 3, -1, -1)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x)[:, :1].mean(dim=(2, 3), keepdim=True)
    f = _per_sample(f)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_sample(f)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc
    chroma = maxc - minc
    s = chroma / torch.where(flat, torch.ones_like(maxc), maxc)
    div = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    frac = h6 - i
    i = i.to(torch.int64) % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * frac)).clamp(0, 1)
    t = (v * (1 - s * (1 - frac))).clamp(0, 1)
    # Sector i of the hue circle picks (r, g, b) from (v, p, q, t).
    r = torch.stack((v, q, p, p, t, v), 1).gather(1, i.unsqueeze(1)).squeeze(1)
    g = torch.stack((t, v, v, q, p, p), 1).gather(1, i.unsqueeze(1)).squeeze(1)
    b = torch.stack((p, p, t, v, v, q), 1).gather(1, i.unsqueeze(1)).squeeze(1)
    return torch.stack((r, g, b), dim=1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(hsv)


def solarize(x: torch.Tensor, threshold: int) -> torch.Tensor:
    # Threshold on the 0..255 scale, as PIL's ImageOps.solarize.
    return torch.where(x * 255.0 >= threshold - 0.5, 1.0 - x, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur with one sigma per image, reflect padding."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    coords = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - half
    k = torch.exp(-(coords.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, K)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), k.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), k.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


_JITTER_OPS = (
    (adjust_brightness, BRIGHTNESS),
    (adjust_contrast, CONTRAST),
    (adjust_saturation, SATURATION),
    (adjust_hue, HUE),
)


def apply_strong(x: torch.Tensor, params: torch.Tensor, spec: AugSpec) -> torch.Tensor:
    """Color jitter (p=jitter_p) then exactly one of grayscale/solarize/blur.

    ``x`` is float (B, 3, H, W) in [0, 1]; ``params`` from ``sample_params``.
    """
    x = x.clone()
    params = params.to(x.device)
    jitter_on = params[:, JITTER_ON] > 0.5
    order = params[:, ORDER].long()
    for position in range(4):
        for op_index, (op, col) in enumerate(_JITTER_OPS):
            sel = jitter_on & (order[:, position] == op_index)
            if sel.any():
                x[sel] = op(x[sel], params[sel, col])
    strong = params[:, STRONG_OP].long()
    sel = strong == STRONG_OPS.index("grayscale")
    if sel.any():
        x[sel] = grayscale(x[sel])
    sel = strong == STRONG_OPS.index("solarize")
    if sel.any():
        x[sel] = solarize(x[sel], spec.solarize_threshold)
    sel = strong == STRONG_OPS.index("blur")
    if sel.any():
        x[sel] = gaussian_blur(x[sel], params[sel, BLUR_SIGMA], spec.blur_kernel_size)
    return x


def apply_strong_uint8(x: torch.Tensor, params: torch.Tensor, spec: AugSpec) -> torch.Tensor:
    """uint8 in, uint8 out (the CPU-worker path keeps batches small for IPC)."""
    y = apply_strong(x.float().div_(255.0), params, spec)
    return y.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
