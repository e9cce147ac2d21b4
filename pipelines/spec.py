"""The augmentation spec: every number a backend needs to build the views.

LUT: one decode, two views, each drawn independently:

* view 1 (crop and flip only; MAE reconstructs its masked patches):  SRC -> normalize
* view 2 (the more strongly augmented view):  SRC -> ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8
                                              -> exactly one of {grayscale, solarize, blur} -> normalize

(With ``lut.direction=symmetric`` both views are masked for the student and both are seen whole by
the target encoder; one-way uses view 1 for the student and view 2 for the target.)

SRC = DeiT-III "simple random crop": resize the shorter side to S (bicubic),
pad 4 px (reflect), random S x S crop, horizontal flip p=0.5. Since the resize
depends only on the image, storage converted at shorter side S serves SRC
exactly (the loaders then skip the resize).

MAE baseline: RandomResizedCrop(S, scale 0.2..1, bicubic) + flip, one view.

How the jitter and the 3-augment ops are computed (one composed colour map
per image, YIQ hue, per-image blur window) is described in ``photometric.py``.
Backends (torch, DALI, FFCV) read this object; none hard-codes a number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Recipe = Literal["lut", "mae"]
STRONG_OPS = ("grayscale", "solarize", "blur")


@dataclass(frozen=True)
class AugSpec:
    recipe: Recipe = "lut"  # "lut": two views (view 1: SRC; view 2: SRC + jitter + one op); "mae": one RRC view
    img_size: int = 224  # output size S of every view
    # Simple random crop (both LUT views)
    src_padding: int = 4  # SRC: pad before the random S x S crop
    src_padding_mode: str = "reflect"  # SRC padding mode
    flip_p: float = 0.5  # horizontal flip probability (every view)
    interpolation: str = "bicubic"  # resize filter
    # View 2's color jitter (torchvision ColorJitter semantics, random op order)
    jitter_p: float = 0.8  # probability of color jitter on view 2
    brightness: float = 0.4  # factor uniform in [1-b, 1+b]
    contrast: float = 0.4  # factor uniform in [1-c, 1+c]
    saturation: float = 0.2  # factor uniform in [1-s, 1+s]
    hue: float = 0.1  # shift uniform in [-h, h]
    # View 2's "3-augment": exactly one op per sample, chosen uniformly
    strong_ops: tuple[str, ...] = STRONG_OPS  # view 2: exactly one, chosen uniformly
    solarize_threshold: int = 128  # on 0..255: pixels >= threshold are inverted
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # PIL GaussianBlur radius, uniform
    # MAE baseline view
    rrc_scale: tuple[float, float] = (0.2, 1.0)  # MAE view: RandomResizedCrop area range
    rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)  # MAE view: aspect ratio range
    # Normalisation applied to every view (after conversion to 0..1)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation (ImageNet)
    std: tuple[float, float, float] = IMAGENET_STD  # normalisation (ImageNet)

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples so the spec stays hashable and frozen.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        from lut_fast.config import validate_aug  # every config check lives in one place

        validate_aug(self)

    @property
    def blur_kernel_size(self) -> int:
        """Odd window covering +-3 sigma of the largest blur (13 px for sigma 2): the widest any image gets.

        Each image's own window is 2 * ceil(3 sigma) + 1 (``photometric.blur_window``).
        """
        import math

        return 2 * math.ceil(3.0 * self.blur_sigma[1]) + 1

    @classmethod
    def for_method(cls, method: str, img_size: int, **overrides) -> "AugSpec":
        return cls(recipe="mae" if method == "mae" else "lut", img_size=img_size, **overrides)
