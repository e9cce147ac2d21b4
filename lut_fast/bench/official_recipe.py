"""The reference row of ``bench data``: LUT's views built the way the authors' released code builds them.

Written here from the description of that code, not copied from it: every
view is its own torchvision transform chain applied to the decoded PIL
image, so each view resizes the full image again (one decode, two resizes),
then converts to a float tensor (``ToTensor``) and normalises on the CPU, in a
plain ``torch.utils.data.DataLoader`` with the same number of workers as the
backends. The numbers come from the same ``AugSpec`` as every backend:

* view 1: Resize(S, bicubic) -> RandomCrop(S, padding 4, reflect) -> flip(p)
  -> ToTensor -> Normalize
* view 2: the same geometry (drawn independently) -> ColorJitter(...) with
  p = 0.8 -> exactly one of {Grayscale(3 channels), Solarize(128), Gaussian
  blur with a PIL radius uniform in [0.1, 2.0]} -> ToTensor -> Normalize

It exists only to be measured against: every LUT row of ``bench data`` prints
its ratio to this one. It is CPU-only by nature (photometric ops on PIL images).
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from lut_fast.pipelines.spec import AugSpec


class PilGaussianBlur:
    """PIL's Gaussian blur with a radius drawn uniformly from ``sigma``."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PilSolarize:
    def __init__(self, threshold: int):
        self.threshold = threshold

    def __call__(self, img):
        from PIL import ImageOps

        return ImageOps.solarize(img, self.threshold)


def official_view_transforms(spec: AugSpec):
    """(view 1 transform, view 2 transform): torchvision chains on PIL images, per the module doc."""
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
              "nearest": T.InterpolationMode.NEAREST}[spec.interpolation]

    def geometry():
        return [
            T.Resize(spec.img_size, interpolation=interp),
            T.RandomCrop(spec.img_size, padding=spec.src_padding, padding_mode=spec.src_padding_mode),
            T.RandomHorizontalFlip(spec.flip_p),
        ]

    tail = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    ops = {"grayscale": T.Grayscale(num_output_channels=3), "solarize": PilSolarize(spec.solarize_threshold),
           "blur": PilGaussianBlur(spec.blur_sigma)}
    view2_ops = [
        T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        T.RandomChoice([ops[name] for name in spec.strong_ops]),
    ]
    return T.Compose(geometry() + tail), T.Compose(geometry() + view2_ops + tail)


class OfficialDualViewDataset(torch.utils.data.Dataset):
    """(view 1, view 2, label): one PIL decode per image, each view through its own transform chain."""

    def __init__(self, samples: Sequence[tuple[str, int]], spec: AugSpec):
        self.samples = list(samples)
        self.view1, self.view2 = official_view_transforms(spec)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as f:
            img = f.convert("RGB")
        return self.view1(img), self.view2(img), label


class OfficialLoader:
    """A DataLoader over ``OfficialDualViewDataset`` with ``len()`` and ``set_epoch`` like lut-fast's loaders."""

    backend = "official"

    def __init__(self, samples: Sequence[tuple[str, int]], spec: AugSpec, batch_size: int, num_workers: int,
                 seed: int = 0):
        if spec.recipe != "lut":
            raise ValueError("the official-recipe reference is the LUT dual-view recipe")
        self.dataset = OfficialDualViewDataset(samples, spec)
        self.seed = seed
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
            persistent_workers=num_workers > 0, generator=self.generator,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch)

    def __iter__(self):
        for view1, view2, labels in self.loader:
            yield view1, view2, labels
