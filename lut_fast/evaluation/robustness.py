"""Robustness of a classifier: center occlusion, ImageNet-C style corruptions, distribution-shift sets.

Input: classifiers that ``lut-fast eval finetune`` (``finetuned.pt``) or
``lut-fast eval linear`` (``linear_head.pt`` + the encoder it was trained on)
wrote. Several classifiers are evaluated on the same images in one pass: the
decoded and corrupted batches, the costly part on a CPU, are made once.

* **Clean and center occlusion**: the val images with the evaluation
  transform (resize the shorter side to ``size / crop_pct``, center crop), and
  the same images with a centred square set to black (or to the
  normalisation mean: 0 after normalising). The square covers
  ``occlusion`` of the image area; by default one patch of the classifier
  (the paper's "center patch"). On an even patch grid (224 px / 16 px = 14)
  there is no single central token: the centred square then straddles the
  four central tokens.
* **Corruptions** (the 15 ImageNet-C ones, the 4 validation ones, severities
  1-5) from the ``imagecorruptions`` package (its maintained fork
  ``imagecorruptions-imaug``: the ``robustness`` extra), applied on the fly
  after the center crop, so at the classifier's resolution. Each image's
  randomness is seeded from (``seed``, its path inside the set, corruption,
  severity): the same image gets the same corruption in every run, whatever
  the batch size, worker count or order.
* **mCE** (ImageNet-C): the corruption error of each corruption, summed over
  severities and divided by a reference model's (AlexNet's in ImageNet-C; a
  file of reference errors, see ``load_reference_errors``), averaged over
  corruptions; relative mCE when the reference also gives its clean error.
* **Distribution-shift sets** on disk (ImageNet-V2, -R, -A, -Sketch,
  ObjectNet): class folders are mapped to the classifier's classes by name
  (WordNet ids), by index (ImageNet-V2's folders ``0`` .. ``999``) or by a
  mapping file; the logits are restricted to the classes the set has (the
  200 of -R and -A; ObjectNet's overlap), and a prediction is right when it
  falls into the image's class (ObjectNet: one of the ImageNet classes mapped
  to its folder).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from lut_fast.config import to_dict
from lut_fast.errors import UserError

# imagecorruptions' groups, in ImageNet-C's order (the "common" 15 are the benchmark; "validation" its 4 held-out ones).
CORRUPTION_GROUPS = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    "validation": ("speckle_noise", "gaussian_blur", "spatter", "saturate"),
}
CORRUPTION_GROUPS["common"] = sum((CORRUPTION_GROUPS[g] for g in ("noise", "blur", "weather", "digital")), ())
CORRUPTION_GROUPS["all"] = CORRUPTION_GROUPS["common"] + CORRUPTION_GROUPS["validation"]
SEVERITIES = (1, 2, 3, 4, 5)
OCCLUSION_FILLS = ("black", "mean")

# AlexNet's top-1 error on ImageNet-C, per corruption, averaged over severities 1-5 (as fractions): the
# normaliser of ImageNet-C's mCE (Hendrycks & Dietterich, ICLR 2019), used by `--reference-errors alexnet`.
ALEXNET_IMAGENET_C = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}


@dataclass
class RobustnessConfig:
    """Every setting of ``lut-fast eval robustness`` (the classifiers and ``--out`` are the command's own arguments).

    Built like the other eval commands' settings (``evaluation/config.py``): defaults <- ``--config`` <- flags <-
    ``--set``; each field's comment is its ``--help``.
    """

    data: Optional[str] = None  # val split: ROOT/val, or ROOT's class folders; None = the built-in val split
    occlusion: Optional[float] = None  # occluded share of the image area, a centred square; None = one patch (the paper); 0 = skip
    occlusion_fill: str = "black"  # black (pixels 0) | mean (the normalisation mean: 0 after normalising)
    # corruption names and/or groups (comma lists): noise, blur, weather, digital, common, validation, all; none = skip
    corruptions: list[str] = field(default_factory=lambda: ["common"])  # names and/or groups; none = skip
    severities: str = "1,2,3,4,5"  # comma list of severities (1..5)
    reference_errors: Optional[str] = None  # reference errors for mCE: alexnet (ImageNet-C's) or a YAML/JSON file (README)
    shift: list[str] = field(default_factory=list)  # distribution-shift set NAME=FOLDER (repeatable): ImageNet-V2/-R/-A/-Sketch/ObjectNet
    class_map: list[str] = field(default_factory=list)  # NAME=FILE (repeatable): maps a set's folders to the classifier's classes
    max_images: Optional[int] = None  # evaluate an evenly spaced subset of this many images per set (quick runs)
    batch_size: int = 64  # images per forward pass
    workers: int = 2  # data loading (and corrupting) processes
    crop_pct: float = 0.875  # eval transform: resize to size / crop_pct (bicubic), center crop
    seed: int = 0  # seeds every image's corruption
    device: str = "auto"  # where it runs: auto | cpu | cuda (or cuda:N)
    # Where each value came from (filled by load_command_config); not a setting: never saved or compared.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={"recipe": False})

    def source(self, key: str) -> str:
        from lut_fast.config import SOURCE_DEFAULT

        return self.sources.get(key, SOURCE_DEFAULT)

    @property
    def severity_levels(self) -> list[int]:
        try:
            return sorted({int(v) for v in str(self.severities).split(",") if v.strip()})
        except ValueError:
            raise UserError(f"--severities is a comma list of integers 1..5, got {self.severities!r}") from None

    @property
    def shift_sets(self) -> dict[str, str]:
        return parse_pairs(self.shift, "--shift")

    @property
    def class_maps(self) -> dict[str, str]:
        return parse_pairs(self.class_map, "--class-map")

    def validate(self) -> None:
        if self.occlusion is not None and not 0.0 <= self.occlusion < 1.0:
            raise UserError(f"--occlusion is a share of the image area in [0, 1), got {self.occlusion}")
        if self.occlusion_fill not in OCCLUSION_FILLS:
            raise UserError(f"--occlusion-fill must be one of {', '.join(OCCLUSION_FILLS)}, got {self.occlusion_fill!r}")
        levels = self.severity_levels
        bad = [s for s in levels if s not in SEVERITIES]
        if bad or not levels:
            raise UserError(f"--severities must be among 1..5, got {self.severities}")
        resolve_corruptions(self.corruptions)
        if self.max_images is not None and self.max_images < 1:
            raise UserError(f"--max-images must be >= 1, got {self.max_images}")
        if self.batch_size < 1 or self.workers < 0:
            raise UserError("--batch-size must be >= 1 and --workers >= 0")
        if not 0.0 < self.crop_pct <= 1.0:
            raise UserError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        shifts = self.shift_sets
        for name in self.class_maps:
            if name != "val" and name not in shifts:
                raise UserError(f"--class-map {name}=...: no set called {name!r} (sets: val{''.join(', ' + s for s in shifts)})")
        if "val" in shifts:
            raise UserError("'val' names the clean val split (--data); give the shift set another name")


def parse_pairs(items: Sequence[str] | None, option: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}`` (a one-line error for anything else)."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UserError(f"{option} takes NAME=PATH, got {item!r}")
        if name.strip() in out:
            raise UserError(f"{option}: {name.strip()!r} given twice")
        out[name.strip()] = value.strip()
    return out


def resolve_corruptions(selection: Sequence[str]) -> list[str]:
    """Corruption names from names and group names (comma-separated allowed), in ImageNet-C order, no repeats."""
    wanted: list[str] = []
    for item in selection:
        for token in (t.strip() for t in str(item).split(",")):
            if not token or token == "none":
                continue
            names = CORRUPTION_GROUPS.get(token, (token,) if token in CORRUPTION_GROUPS["all"] else None)
            if names is None:
                raise UserError(
                    f"unknown corruption {token!r}; choose names ({', '.join(CORRUPTION_GROUPS['all'])}) "
                    f"or groups ({', '.join(CORRUPTION_GROUPS)}), or none"
                )
            wanted += [n for n in names if n not in wanted]
    order = CORRUPTION_GROUPS["all"]
    return sorted(wanted, key=order.index)


# ---------------------------------------------------------------- corruptions


def corruption_library():
    """The ``imagecorruptions`` module, or a one-line error saying how to install it."""
    try:
        import imagecorruptions
    except ImportError as e:
        raise UserError(
            f"corruptions need the robustness extra (imagecorruptions: {e}): pip install 'lut-fast[robustness]', "
            "or pass --corruptions none"
        ) from None
    except Exception as e:  # noqa: BLE001 - the unmaintained 2020 release fails to import on numpy 2 / scipy 1.14
        raise UserError(
            f"imagecorruptions fails to import ({type(e).__name__}: {e}); install its maintained fork: "
            "pip uninstall imagecorruptions && pip install 'lut-fast[robustness]'"
        ) from None
    return imagecorruptions


def library_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def image_seed(seed: int, key: str, corruption: str, severity: int) -> int:
    """A 31-bit seed from everything that identifies one corrupted image (stable across runs and machines)."""
    digest = hashlib.blake2b(f"{seed}|{key}|{corruption}|{severity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (H, W, 3) uint8 corrupted, deterministically for ``seed``.

    imagecorruptions draws from numpy's global generator (seeded here, and put
    back afterwards) and, for glass blur and impulse noise, from a seed
    argument (given the same seed).
    """
    lib = corruption_library()
    fn = lib.corruption_dict[corruption]
    kwargs = {"seed": seed} if "seed" in inspect.signature(fn).parameters else {}
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = lib.corrupt(np.ascontiguousarray(image), severity=severity, corruption_name=corruption, **kwargs)
    finally:
        np.random.set_state(state)
    out = np.asarray(out)
    if out.shape != image.shape:
        raise RuntimeError(f"{corruption} returned shape {out.shape} for an image of shape {image.shape}")
    return out.astype(np.uint8, copy=False)


def probe_corruptions(names: Sequence[str], size: int) -> tuple[list[str], dict[str, str]]:
    """(usable, skipped {name: why}): each corruption is tried once on a small image of the evaluation size.

    A corruption whose dependency is missing or broken in this environment is
    skipped (and said so in the output), not a failed evaluation. The try also
    compiles glass blur's numba kernel once, before the loader's processes fork.
    """
    if not names:
        return [], {}
    if size < 32:
        return [], {n: f"imagecorruptions needs images of at least 32 px, the classifier takes {size} px" for n in names}
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    usable, skipped = [], {}
    for name in names:
        try:
            corrupt_image(image, name, 1, 0)
            usable.append(name)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a dependency raises, the rest of the evaluation goes on
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return usable, skipped


# ---------------------------------------------------------------- occlusion


def occlusion_box(img_size: int, fraction: float) -> tuple[int, int]:
    """(start, side) of the centred square covering ``fraction`` of an ``img_size`` x ``img_size`` image."""
    side = min(img_size, round(img_size * math.sqrt(fraction)))
    return (img_size - side) // 2, side


def occlude_center(images: torch.Tensor, fraction: float, fill: str = "black") -> torch.Tensor:
    """A copy of uint8 ``images`` (B, 3, H, W) with the centred square of ``fraction`` of the area filled."""
    from lut_fast.pipelines.spec import IMAGENET_MEAN

    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    start, side = occlusion_box(h, fraction)
    out = images.clone()
    if side == 0:
        return out
    if fill == "black":
        out[..., start:start + side, start:start + side] = 0
    else:
        value = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=out.dtype, device=out.device).view(3, 1, 1)
        out[..., start:start + side, start:start + side] = value
    return out


# ---------------------------------------------------------------- classifiers


class LinearProbeClassifier(nn.Module):
    """Frozen encoder -> pooled feature -> the linear probe's BatchNorm + Linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pool: str):
        super().__init__()
        self.encoder, self.head, self.pool = encoder, head, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lut_fast.evaluation.common import pool_tokens

        return self.head(pool_tokens(self.encoder(x), self.pool))


@dataclass
class Classifier:
    model: nn.Module
    classes: list[str]
    img_size: int
    patch_size: int
    info: dict  # what the result records: path, kind, the pre-training checkpoint it came from


def load_classifier(path: str | os.PathLike, label: str | None = None) -> Classifier:
    """A classifier from ``finetuned.pt`` (``eval finetune``) or ``linear_head.pt`` (``eval linear``)."""
    from lut_fast.checkpoint import load_encoder, load_file

    path = Path(path)
    ckpt = load_file(path)
    label = label or _default_label(path)
    if isinstance(ckpt, dict) and "finetuned" in ckpt:
        from timm.models.vision_transformer import VisionTransformer

        kwargs = {"qkv_bias": True, **ckpt["timm_kwargs"]}  # qkv_bias: as build_classifier made it
        model = VisionTransformer(**kwargs)
        model.load_state_dict(ckpt["model"])
        source = ckpt.get("source") or {}
        return Classifier(model.eval(), list(ckpt["classes"]), kwargs["img_size"], kwargs["patch_size"], {
            "label": label, "path": str(path), "kind": "finetuned", "source_checkpoint": source.get("checkpoint"),
            "method": source.get("method"), "pool": "mean" if kwargs.get("global_pool") == "avg" else "cls",
            "metrics": ckpt.get("metrics"),
        })
    if isinstance(ckpt, dict) and "head" in ckpt and "classes" in ckpt and "encoder" in ckpt:
        from lut_fast.evaluation.linear import linear_head

        enc_info = ckpt["encoder"]
        enc_path = enc_info["checkpoint"]
        if not Path(enc_path).is_file():
            raise UserError(f"{path} is a linear head on {enc_path}, which is no longer there: the head needs its encoder")
        encoder, info = load_encoder(enc_path, use_ema=enc_info.get("use_ema", False), num_heads=enc_info.get("num_heads"),
                                     random_init=enc_info.get("random_init", False),
                                     random_init_seed=enc_info.get("random_init_seed") or 0)
        head = linear_head(info["embed_dim"], len(ckpt["classes"]))
        head.load_state_dict(ckpt["head"])
        model = LinearProbeClassifier(encoder, head, ckpt["pool"])
        return Classifier(model.eval(), list(ckpt["classes"]), info["img_size"], info["patch_size"], {
            "label": label, "path": str(path), "kind": "linear", "source_checkpoint": enc_path,
            "method": info.get("method"), "pool": ckpt["pool"],
        })
    if isinstance(ckpt, dict) and "format" in ckpt:
        raise UserError(
            f"{path} is a pre-training checkpoint, without a classifier: run `lut-fast eval finetune {path}` first and "
            "pass the finetuned.pt it writes (or `lut-fast eval linear` and its linear_head.pt)"
        )
    raise UserError(
        f"{path} holds no classifier (an encoder or an unknown file): pass the finetuned.pt of `lut-fast eval finetune` "
        "or the linear_head.pt of `lut-fast eval linear`"
    )


def _default_label(path: Path) -> str:
    """``<run>`` for ``<run>/eval/<command>/<file>``, else the file's folder and name."""
    p = path.resolve()
    if p.parent.parent.name == "eval":
        return f"{p.parent.parent.parent.name} ({p.parent.name})"
    return f"{p.parent.name}/{p.name}"


# ---------------------------------------------------------------- class mapping


@dataclass
class ClassMapping:
    """How a set's class folders relate to one classifier's classes."""

    targets: list[list[int]]  # per folder of the set: the classifier's class indices that count as right ([] = skipped)
    allowed: list[int]  # the classifier's classes the logits are restricted to (all of them: no restriction)
    how: str  # "names" | "indices" | "mapping file"
    skipped_folders: list[str]

    def describe(self, num_classes: int) -> dict:
        return {"mapped_by": self.how, "restricted_to_classes": len(self.allowed) if len(self.allowed) < num_classes else None,
                "skipped_folders": self.skipped_folders}


def load_class_map(path: str | os.PathLike) -> dict[str, list]:
    """A mapping file: YAML or JSON, ``{folder name: class}`` where a class is a class name of the classifier
    (its training folder name: a WordNet id for ImageNet) or its index, or a list of those."""
    from lut_fast.config import read_yaml_mapping

    p = Path(path).expanduser()
    data = read_yaml_mapping(p, "class mapping file")
    if not data:
        raise UserError(f"{p}: a class mapping is a YAML/JSON mapping {{folder name: class or [classes]}}")
    return {str(k): (v if isinstance(v, list) else [v]) for k, v in data.items()}


def map_classes(set_name: str, folders: Sequence[str], classes: Sequence[str], mapping: dict[str, list] | None = None) -> ClassMapping:
    """Map a set's class folders to the classifier's classes (see the module docstring); a one-line error when they do not map."""
    index = {c: i for i, c in enumerate(classes)}
    if mapping is not None:
        targets, skipped = [], []
        for folder in folders:
            wanted = mapping.get(folder, [])
            ids = []
            for c in wanted:
                if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(classes):
                    ids.append(c)
                elif str(c) in index:
                    ids.append(index[str(c)])
                else:
                    raise UserError(f"{set_name}: the mapping sends folder {folder!r} to {c!r}, not a class of the classifier "
                                    f"({len(classes)} classes, e.g. {', '.join(classes[:3])})")
            targets.append(sorted(set(ids)))
            if not ids:
                skipped.append(folder)
        if len(skipped) == len(folders):
            raise UserError(f"{set_name}: none of its {len(folders)} class folders is in the mapping file "
                            f"(folders e.g. {', '.join(folders[:3])}; mapping keys e.g. {', '.join(list(mapping)[:3])})")
        how = "mapping file"
    elif all(f in index for f in folders):
        targets, skipped, how = [[index[f]] for f in folders], [], "names"
    elif all(f.isdigit() for f in folders) and all(int(f) < len(classes) for f in folders):
        targets, skipped, how = [[int(f)] for f in folders], [], "indices"  # ImageNet-V2: folder k is class k
    else:
        unknown = [f for f in folders if f not in index]
        raise UserError(
            f"{set_name}: {len(unknown)} of its {len(folders)} class folders are not classes of the classifier "
            f"({', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}; the classifier's are e.g. {', '.join(classes[:3])}) "
            f"nor class indices; give a mapping file: --class-map {set_name}=FILE"
        )
    allowed = sorted({i for t in targets for i in t})
    return ClassMapping(targets, allowed, how, skipped)


# ---------------------------------------------------------------- data


@dataclass
class EvalSet:
    name: str
    root: Path
    folders: list[str]
    samples: list[tuple[str, int]]  # (path, folder index)
    total_images: int  # before --max-images


def scan_set(name: str, path: str | os.PathLike | None, max_images: int | None) -> EvalSet:
    """A class-folder tree (``ROOT/val`` when there is one); ``None``: the built-in val split."""
    from lut_fast.datasets.imagefolder import scan_image_folder

    if path is None:
        from lut_fast.datasets.builtin import builtin_path

        path = builtin_path()
    index = scan_image_folder(path, "val")
    samples = list(index.samples)
    total = len(samples)
    if max_images is not None and max_images < total:
        # Evenly spaced over the class-sorted list: every class keeps its share.
        picks = np.linspace(0, total - 1, max_images).round().astype(int)
        samples = [samples[i] for i in sorted(set(picks.tolist()))]
    return EvalSet(name, Path(index.root), list(index.classes), samples, total)


class ConditionImages(torch.utils.data.Dataset):
    """(uint8 CHW image, folder index): the evaluation transform, then (optionally) one corruption."""

    def __init__(self, samples, root: Path, img_size: int, crop_pct: float, corruption: str | None = None,
                 severity: int = 0, seed: int = 0):
        self.samples, self.root, self.img_size, self.crop_pct = samples, root, img_size, crop_pct
        self.corruption, self.severity, self.seed = corruption, severity, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from lut_fast.evaluation.common import center_crop, load_rgb

        path, label = self.samples[i]
        image = np.asarray(center_crop(load_rgb(path), self.img_size, self.crop_pct))
        if self.corruption is not None:
            key = os.path.relpath(path, self.root).replace(os.sep, "/")
            image = corrupt_image(image, self.corruption, self.severity, image_seed(self.seed, key, self.corruption, self.severity))
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), label


# ---------------------------------------------------------------- evaluation


class Scorer:
    """Counts one classifier's right answers on one set under its class mapping."""

    def __init__(self, mapping: ClassMapping, num_classes: int, device: torch.device):
        self.allowed = torch.tensor(mapping.allowed, device=device)
        right = torch.zeros(len(mapping.targets), num_classes, dtype=torch.bool)
        for folder, ids in enumerate(mapping.targets):
            right[folder, ids] = True
        self.right = right.to(device)
        self.correct, self.seen = 0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        pred = self.allowed[logits[:, self.allowed].argmax(dim=1)]
        self.correct += int(self.right[labels, pred].sum())
        self.seen += labels.numel()

    def top1(self) -> float:
        return 100.0 * self.correct / max(1, self.seen)


def _loader(dataset, batch_size: int, workers: int, device: torch.device):
    # No thread settings in the workers: cv2.setNumThreads in a forked worker waits forever on the parent's
    # OpenCV thread pool (which the corruption probe started), so the workers keep OpenCV as forked.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=device.type == "cuda")


@torch.no_grad()
def _score_pass(loader, classifiers, mappings, device, bar, task, variants) -> list[list[float]]:
    """One pass over a set; ``variants`` are functions of the uint8 batch (identity = as loaded).

    Returns top-1 per variant per classifier.
    """
    from lut_fast.evaluation.common import normalize
    from lut_fast.runtime import inference_autocast as autocast

    scorers = [[Scorer(m, len(c.classes), device) for c, m in zip(classifiers, mappings)] for _ in variants]
    for x, y in loader:
        y = y.to(device)
        for v, variant in enumerate(variants):
            xv = normalize(variant(x), device)
            for k, clf in enumerate(classifiers):
                with autocast(device):
                    logits = clf.model(xv).float()
                scorers[v][k].add(logits, y)
        if bar is not None:
            bar.advance(task)
    return [[s.top1() for s in row] for row in scorers]


def load_reference_errors(spec: str) -> dict:
    """Reference errors for mCE: ``alexnet`` (built in) or a YAML/JSON file::

        name: AlexNet            # optional, shown in the output
        unit: fraction           # fraction (0.886) or percent (88.6)
        clean: 0.434             # optional: the reference's clean error, for relative mCE
        errors:
          gaussian_noise: 0.886428                      # mean over severities 1-5
          shot_noise: [0.70, 0.82, 0.90, 0.95, 0.98]    # or one error per severity 1..5

    Returned with every error in percent.
    """
    from lut_fast.config import read_yaml_mapping

    if spec == "alexnet":
        data = {"name": "AlexNet (ImageNet-C)", "unit": "fraction", "errors": dict(ALEXNET_IMAGENET_C)}
    else:
        p = Path(spec).expanduser()
        if not p.is_file():
            raise UserError(f"reference errors file not found: {p} (or pass alexnet)")
        data = read_yaml_mapping(p, "reference errors file")
        if not isinstance(data.get("errors"), dict) or not data["errors"]:
            raise UserError(f"{p}: reference errors need an 'errors' mapping {{corruption: error or [5 errors]}} (see the README)")
    unit = data.get("unit", "fraction")
    if unit not in ("fraction", "percent"):
        raise UserError(f"reference errors: unit must be fraction or percent, got {unit!r}")
    scale = 100.0 if unit == "fraction" else 1.0

    def value(v, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v * scale <= 100:
            raise UserError(f"reference errors: {where} must be an error rate in (0, {100 / scale:g}] ({unit}), got {v!r}")
        return float(v) * scale

    errors: dict[str, float | list[float]] = {}
    for name, v in data["errors"].items():
        if name not in CORRUPTION_GROUPS["all"]:
            raise UserError(f"reference errors: unknown corruption {name!r}")
        if isinstance(v, list):
            if len(v) != 5:
                raise UserError(f"reference errors: {name} needs one error per severity 1..5, got {len(v)} values")
            errors[name] = [value(x, name) for x in v]
        else:
            errors[name] = value(v, name)
    clean = value(data["clean"], "clean") if data.get("clean") is not None else None
    return {"name": str(data.get("name", spec)), "errors": errors, "clean": clean}


def corruption_errors(top1: dict[str, dict[int, float]], clean_top1: float | None, reference: dict) -> dict:
    """ImageNet-C's CE per corruption and mCE (percent; the reference model scores 100).

    CE_c = 100 * sum_s E(c, s) / sum_s E_ref(c, s) over the severities evaluated
    (a reference given as one mean over severities 1-5 needs all five);
    relative CE_c = 100 * sum_s (E(c, s) - E_clean) / sum_s (E_ref(c, s) - E_ref_clean).
    """
    ce, rce, skipped = {}, {}, {}
    for name, by_sev in top1.items():
        ref = reference["errors"].get(name)
        if ref is None:
            skipped[name] = "no reference error"
            continue
        sevs = sorted(by_sev)
        errs = [100.0 - by_sev[s] for s in sevs]
        if isinstance(ref, list):
            ref_errs = [ref[s - 1] for s in sevs]
        elif sevs == list(SEVERITIES):
            ref_errs = [ref] * 5  # a mean over the five severities: the sums compare as the means do
        else:
            skipped[name] = "the reference is a mean over severities 1-5; this run has severities " + ",".join(map(str, sevs))
            continue
        ce[name] = 100.0 * sum(errs) / sum(ref_errs)
        if clean_top1 is not None and reference.get("clean") is not None:
            denom = sum(r - reference["clean"] for r in ref_errs)
            if denom > 0:
                rce[name] = 100.0 * sum(e - (100.0 - clean_top1) for e in errs) / denom
    out = {"reference": reference["name"], "ce": ce, "mce": float(np.mean(list(ce.values()))) if ce else None,
           "skipped": skipped}
    if rce:
        out["relative_ce"] = rce
        out["relative_mce"] = float(np.mean(list(rce.values())))
    return out


def default_out(first: str | os.PathLike) -> Path:
    """``<run>/eval/robustness`` for ``<run>/eval/<command>/<file>``, else ``<folder>/<stem>_eval/robustness``."""
    from lut_fast.evaluation.common import default_out as common_default_out

    p = Path(first)
    if p.parent.parent.name == "eval":
        return p.parent.parent / "robustness"
    return common_default_out(p, "robustness")


def run_robustness(classifier_paths: Sequence[str | os.PathLike], cfg: RobustnessConfig, show_progress: bool = True,
                   labels: Sequence[str] | None = None, out: str | os.PathLike | None = None) -> dict:
    """Evaluate ``classifier_paths`` on everything ``cfg`` asks; writes robustness.json and robustness.png into ``out``."""
    from lut_fast.evaluation.common import progress, write_json
    from lut_fast.runtime import resolve_device

    t0 = time.perf_counter()
    cfg.validate()
    if not classifier_paths:
        raise UserError("give at least one classifier (finetuned.pt or linear_head.pt)")
    if labels is not None and len(labels) != len(classifier_paths):
        raise UserError(f"{len(labels)} labels for {len(classifier_paths)} classifiers")
    device = resolve_device(cfg.device)
    classifiers = [load_classifier(p, labels[i] if labels else None) for i, p in enumerate(classifier_paths)]
    for c in classifiers:
        c.model.to(device)
    sizes = {c.img_size for c in classifiers}
    if len(sizes) > 1:
        raise UserError(f"the classifiers take different image sizes ({sorted(sizes)}): evaluate them separately")
    img_size = classifiers[0].img_size
    names = [c.info["label"] for c in classifiers]
    if len(set(names)) < len(names):
        for i, c in enumerate(classifiers):  # two files with the same default label: number them
            c.info["label"] = f"{names[i]} #{i + 1}"

    val = scan_set("val", cfg.data, cfg.max_images)
    shifts = [scan_set(name, path, cfg.max_images) for name, path in cfg.shift_sets.items()]
    maps = {name: load_class_map(path) for name, path in cfg.class_maps.items()}
    mappings = {s.name: [map_classes(s.name, s.folders, c.classes, maps.get(s.name)) for c in classifiers] for s in [val, *shifts]}

    def kept(s: EvalSet) -> list:
        """Images of folders that map for every classifier (ObjectNet's non-ImageNet classes drop out)."""
        skip = {f for m in mappings[s.name] for f in m.skipped_folders}
        return [(p, y) for p, y in s.samples if s.folders[y] not in skip]

    # Occlusion: one patch of the (first) classifier by default.
    patch = classifiers[0].patch_size
    fraction = (patch * patch) / (img_size * img_size) if cfg.occlusion is None else cfg.occlusion
    start, side = occlusion_box(img_size, fraction)
    corruptions = resolve_corruptions(cfg.corruptions)
    if corruptions:
        corruption_library()
    usable, skipped = probe_corruptions(corruptions, img_size)
    for name, why in skipped.items():
        print(f"lut-fast: skipping corruption {name}: {why}", file=sys.stderr)
    severities = cfg.severity_levels

    def batches(n: int) -> int:
        return math.ceil(n / cfg.batch_size)

    val_samples = kept(val)
    passes = batches(len(val_samples)) * (1 + len(usable) * len(severities)) + sum(batches(len(kept(s))) for s in shifts)
    results = [{"label": c.info["label"], "corruptions": {}, "shift": {}} for c in classifiers]
    seconds: dict[str, float] = {}  # wall time of each pass over a set (loading, corrupting, every classifier)
    with progress(show_progress) as bar:
        task = bar.add_task("robustness", total=passes, info="") if bar is not None else None

        def describe(text: str) -> None:
            if bar is not None:
                bar.update(task, description=text)

        describe("clean + occluded")
        t_pass = time.perf_counter()
        variants = [lambda x: x]
        if side > 0:
            variants.append(lambda x: occlude_center(x, fraction, cfg.occlusion_fill))
        scores = _score_pass(_loader(ConditionImages(val_samples, val.root, img_size, cfg.crop_pct), cfg.batch_size,
                                     cfg.workers, device), classifiers, mappings["val"], device, bar, task, variants)
        seconds["clean + occluded"] = round(time.perf_counter() - t_pass, 2)
        for k, r in enumerate(results):
            r["clean_top1"] = scores[0][k]
            if side > 0:
                r["occluded_top1"] = scores[1][k]
                r["occlusion_drop"] = scores[0][k] - scores[1][k]
        for name in usable:
            for sev in severities:
                describe(f"{name} {sev}")
                t_pass = time.perf_counter()
                ds = ConditionImages(val_samples, val.root, img_size, cfg.crop_pct, name, sev, cfg.seed)
                scores = _score_pass(_loader(ds, cfg.batch_size, cfg.workers, device), classifiers, mappings["val"],
                                     device, bar, task, [lambda x: x])
                seconds[f"{name} {sev}"] = round(time.perf_counter() - t_pass, 2)
                for k, r in enumerate(results):
                    r["corruptions"].setdefault(name, {})[sev] = scores[0][k]
        for s in shifts:
            describe(s.name)
            t_pass = time.perf_counter()
            samples = kept(s)
            scores = _score_pass(_loader(ConditionImages(samples, s.root, img_size, cfg.crop_pct), cfg.batch_size,
                                         cfg.workers, device), classifiers, mappings[s.name], device, bar, task, [lambda x: x])
            seconds[s.name] = round(time.perf_counter() - t_pass, 2)
            for k, (r, c) in enumerate(zip(results, classifiers)):
                r["shift"][s.name] = {"top1": scores[0][k], "images": len(samples),
                                      **mappings[s.name][k].describe(len(c.classes))}

    reference = load_reference_errors(cfg.reference_errors) if cfg.reference_errors else None
    for r in results:
        table = r["corruptions"]
        if table:
            per_corruption = {name: float(np.mean(list(by_sev.values()))) for name, by_sev in table.items()}
            r["corruption_mean_top1"] = float(np.mean(list(per_corruption.values())))
            r["corruption_top1"] = per_corruption
            r["severity_mean_top1"] = {s: float(np.mean([table[n][s] for n in table])) for s in severities}
            if reference is not None:
                r["mce"] = corruption_errors(table, r["clean_top1"], reference)
        # JSON keys are strings: severities as "1" .. "5"
        r["corruptions"] = {n: {str(s): v for s, v in by_sev.items()} for n, by_sev in table.items()}
        if "severity_mean_top1" in r:
            r["severity_mean_top1"] = {str(s): v for s, v in r["severity_mean_top1"].items()}

    result = {
        "command": "robustness",
        "classifiers": [c.info for c in classifiers],
        "results": results,
        "occlusion": {"fraction_asked": cfg.occlusion, "fraction": (side * side) / (img_size * img_size), "side_px": side,
                      "box": [start, start, start + side, start + side], "fill": cfg.occlusion_fill,
                      "default_one_patch": cfg.occlusion is None, "patch_size": patch},
        "corruption_library": library_version() if corruptions else None,
        "corruptions_run": usable,
        "corruptions_skipped": skipped,
        "severities": severities,
        "img_size": img_size,
        "data": {s.name: {"path": str(s.root), "images": len(kept(s)), "images_in_folder": s.total_images,
                          "class_folders": len(s.folders)} for s in [val, *shifts]},
        "settings": to_dict(cfg),
        "seconds": round(time.perf_counter() - t0, 2),
        "seconds_per_pass": seconds,
    }
    out = Path(out) if out is not None else None
    if out is not None:
        result["plot"] = str(plot_robustness([result], out / "robustness.png"))
        write_json(result, out / "robustness.json")
    return result


def report_values(result: dict) -> list[tuple[dict, dict]]:
    """For ``lut-fast report``: (classifier description, {column: value}) per classifier of a result."""
    rows = []
    for clf, r in zip(result["classifiers"], result["results"]):
        values = {"occluded": r.get("occluded_top1"), "corrupted": r.get("corruption_mean_top1"),
                  "mce": (r.get("mce") or {}).get("mce")}
        rows.append((clf, {k: v for k, v in values.items() if v is not None}))
    return rows


# ---------------------------------------------------------------- plot


def plot_robustness(results: Sequence[dict], out: str | os.PathLike) -> Path:
    """One PNG from robustness results (each may hold several classifiers), the classifiers side by side:
    top-1 per corruption (mean over severities), top-1 against severity (0 = clean; mean over corruptions),
    and clean / occluded / distribution-shift top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lut_fast.evaluation.common import save_figure

    entries = [r for result in results for r in result["results"]]
    if not entries:
        raise UserError("no robustness results to plot")
    colors = plt.get_cmap("tab10")
    width = 0.8 / len(entries)
    fig, (ax_corr, ax_sev, ax_sets) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [3, 1.3, 1.7]})
    corruptions = [n for n in CORRUPTION_GROUPS["all"] if any(n in e.get("corruption_top1", {}) for e in entries)]
    for i, e in enumerate(entries):
        c, offset = colors(i % 10), (i - (len(entries) - 1) / 2) * width
        if corruptions:
            xs = [j + offset for j, n in enumerate(corruptions) if n in e.get("corruption_top1", {})]
            ax_corr.bar(xs, [e["corruption_top1"][n] for n in corruptions if n in e.get("corruption_top1", {})],
                        width, color=c, label=e["label"])
        sev = e.get("severity_mean_top1") or {}
        if sev:
            points = sorted((int(s), v) for s, v in sev.items())
            ax_sev.plot([0] + [p[0] for p in points], [e["clean_top1"]] + [p[1] for p in points], "o-", color=c, label=e["label"])
        sets = [("clean", e.get("clean_top1")), ("occluded", e.get("occluded_top1"))] + [(n, v["top1"]) for n, v in e["shift"].items()]
        sets = [(n, v) for n, v in sets if v is not None]
        ax_sets.bar([j + offset for j in range(len(sets))], [v for _, v in sets], width, color=c, label=e["label"])
        ax_sets.set_xticks(range(len(sets)), [n for n, _ in sets], rotation=30, ha="right")
    if corruptions:
        ax_corr.set_xticks(range(len(corruptions)), [n.replace("_", " ") for n in corruptions], rotation=40, ha="right")
    else:
        for ax in (ax_corr, ax_sev):
            ax.text(0.5, 0.5, "no corruptions run", ha="center", va="center", transform=ax.transAxes)
        ax_corr.set_xticks([])
    ax_corr.set(title="top-1 per corruption (mean over severities)", ylabel="top-1 (%)")
    ax_sev.set(title="top-1 against severity (0 = clean)", xlabel="severity", ylabel="top-1 (%)")
    ax_sev.set_xticks(range(6))
    ax_sets.set(title="clean, center-occluded, shift sets", ylabel="top-1 (%)")
    for ax in (ax_corr, ax_sev, ax_sets):
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, axis="y")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, out)
