"""What every evaluation and analysis command shares.

* ``resolve_splits``: train/val image lists from an ImageFolder split root
  (``root/train``, ``root/val``), or a seeded, per-class split of one folder.
* ``EvalImages``: the deterministic eval transform (resize the shorter side
  to ``img_size / crop_pct``, bicubic; center crop; uint8 out, normalised on
  the device), as MAE's evaluation transform (crop_pct 0.875 = 224 / 256).
* ``extract_features``: frozen-encoder features (cls token or mean of the
  patch tokens after the final norm), with a rich progress bar, and
  ``cached_features`` which stores them on disk keyed by everything that
  changes them, so a second epoch or a second command does not re-encode.
* ``write_json``: atomic JSON results; ``progress``. Device and autocast rules: ``lut_fast/runtime.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from lut_fast.errors import UserError
from lut_fast.evaluation.config import ImageSettings
from lut_fast.fileio import write_json_atomic
from lut_fast.pipelines.spec import IMAGENET_MEAN, IMAGENET_STD
# One home for device and precision rules (lut_fast/runtime.py); evaluation autocasts as inference does.
from lut_fast.runtime import inference_autocast as autocast, resolve_device

POOLS = ("mean", "cls")


# ---------------------------------------------------------------- small utilities


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (numpy / torch values converted)."""
    return write_json_atomic(obj, path, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr (transient); yields ``None`` when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )
    with bar:
        yield bar


def tracked(bar, items: Iterable, description: str, total: int | None = None) -> Iterator:
    """Iterate ``items`` while advancing a task on ``bar`` (from ``progress``); plain iteration when ``bar`` is None."""
    if bar is None:
        yield from items
        return
    task = bar.add_task(description, total=total if total is not None else len(items), info="")  # type: ignore[arg-type]
    for item in items:
        yield item
        bar.advance(task)
    bar.remove_task(task)


# ---------------------------------------------------------------- data


@dataclass
class Splits:
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    classes: list[str]
    source: str  # "train/ and val/ of ROOT" or "ROOT split with seed S"
    root: Path | None = None
    explicit: bool = True  # True: train/ and val/ folders; False: a seeded split of one folder

    def describe(self) -> dict:
        return {"source": self.source, "classes": len(self.classes), "train_images": len(self.train), "val_images": len(self.val)}


def resolve_splits(data: str | os.PathLike | None, val_fraction: float = ImageSettings.val_fraction, seed: int = 0) -> Splits:
    """Train and val image lists.

    ``data`` may be a split root (``train/`` and ``val/`` class folders), or a
    single class-folder tree, which is split per class with ``seed`` (a
    ``val_fraction`` share of each class, at least one image, goes to val).
    ``None`` means the built-in dataset.
    """
    from lut_fast.datasets.imagefolder import scan_image_folder

    if data is None:
        from lut_fast.datasets.builtin import builtin_path

        data = builtin_path()
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = scan_image_folder(root, "train"), scan_image_folder(root, "val")
        if train.classes != val.classes:
            only = sorted(set(train.classes) ^ set(val.classes))
            raise UserError(f"train/ and val/ of {root} have different class folders ({', '.join(only[:5])} ...)")
        return Splits(train.samples, val.samples, train.classes, f"train/ and val/ of {root}", root, True)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    index = scan_image_folder(root, "train")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(index.classes)):
        items = [s for s in index.samples if s[1] == c]
        order = rng.permutation(len(items))
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    if not val:
        raise UserError(f"{index.root} is too small to split into train and val")
    source = f"{index.root} split {1 - val_fraction:.0%}/{val_fraction:.0%} per class, seed {seed}"
    return Splits(train, val, index.classes, source, index.root, False)


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decode failure is a user-facing data problem
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def center_crop(img: Image.Image, img_size: int, crop_pct: float = ImageSettings.crop_pct) -> Image.Image:
    """Resize the shorter side to ``img_size / crop_pct`` (bicubic), then center-crop ``img_size``."""
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop fraction must be in (0, 1], got {crop_pct}")
    short = max(img_size, round(img_size / crop_pct))
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - img_size) // 2, (h - img_size) // 2
    return img.crop((left, top, left + img_size, top + img_size))


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


class EvalImages(torch.utils.data.Dataset):
    """(uint8 CHW image, label), deterministic: the evaluation transform only."""

    def __init__(self, samples: Sequence[tuple[str, int]], img_size: int, crop_pct: float = ImageSettings.crop_pct):
        self.samples, self.img_size, self.crop_pct = list(samples), img_size, crop_pct

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return to_uint8_chw(center_crop(load_rgb(path), self.img_size, self.crop_pct)), label


def normalize(x: torch.Tensor, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float32 on ``device``."""
    x = x.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def image_loader(samples, img_size: int, batch_size: int, workers: int, crop_pct: float = ImageSettings.crop_pct, device=None):
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    return torch.utils.data.DataLoader(
        EvalImages(samples, img_size, crop_pct), batch_size=batch_size, shuffle=False,
        num_workers=workers, pin_memory=device is not None and torch.device(device).type == "cuda",
    )


# ---------------------------------------------------------------- features


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """cls token, or the mean of the patch tokens (LUT's pooling); ``tokens`` is (B, 1 + L, D)."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise UserError(f"unknown pooling {pool!r}; choose {' or '.join(POOLS)}")


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    samples: Sequence[tuple[str, int]],
    pool: str = "mean",
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    workers: int = 2,
    crop_pct: float = ImageSettings.crop_pct,
    bar=None,
    description: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-encoder features (N, D) float32 and labels (N,), on CPU."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    img_size = encoder.patch_embed.img_size[0]
    loader = image_loader(samples, img_size, batch_size, workers, crop_pct, device)
    feats, labels = [], []
    for x, y in tracked(bar, loader, description):
        with autocast(device):
            tokens = encoder(normalize(x, device))
        feats.append(pool_tokens(tokens, pool).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _file_stamp(path: str | os.PathLike) -> dict:
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(**parts: Any) -> str:
    """A short hash of everything that determines a feature file."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def samples_digest(samples: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha1()
    for path, label in samples:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()[:16]


def cached_features(
    cache_dir: Path | None,
    ckpt_path: str | os.PathLike,
    ckpt_info: dict,
    encoder: torch.nn.Module,
    samples: Sequence[tuple[str, int]],
    pool: str,
    device: torch.device,
    batch_size: int,
    workers: int,
    crop_pct: float,
    bar=None,
    description: str = "features",
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``extract_features`` through an on-disk cache; returns (features, labels, from_cache)."""
    if cache_dir is None:
        return (*extract_features(encoder, samples, pool, device, batch_size, workers, crop_pct, bar, description), False)
    key = cache_key(
        ckpt=_file_stamp(ckpt_path), use_ema=ckpt_info.get("use_ema"), random_init=ckpt_info.get("random_init"),
        random_init_seed=ckpt_info.get("random_init_seed"), num_heads=ckpt_info.get("num_heads"), pool=pool,
        crop_pct=crop_pct, samples=samples_digest(samples), version=1,
    )
    path = Path(cache_dir) / f"features_{key}.pt"
    if path.exists():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return data["features"], data["labels"], True
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    feats, labels = extract_features(encoder, samples, pool, device, batch_size, workers, crop_pct, bar, description)
    from lut_fast.checkpoint import atomic_torch_save

    atomic_torch_save({"features": feats, "labels": labels}, path)
    return feats, labels, False


def default_out(ckpt: str | os.PathLike, what: str) -> Path:
    """``<run>/eval/<what>`` for ``<run>/checkpoints/x.pt``, else ``<ckpt folder>/<ckpt stem>_eval/<what>``."""
    p = Path(ckpt)
    if p.parent.name == "checkpoints":
        return p.parent.parent / "eval" / what
    return p.parent / f"{p.stem}_eval" / what


def topk_accuracy(logits_or_scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent; k larger than the number of classes is skipped."""
    out = {}
    n_classes = logits_or_scores.shape[1]
    top = logits_or_scores.topk(min(max(ks), n_classes), dim=1).indices
    for k in ks:
        if k <= n_classes:
            out[f"top{k}"] = 100.0 * (top[:, :k] == labels.view(-1, 1)).any(dim=1).float().mean().item()
    return out


@dataclass
class FrozenFeatures:
    """Both splits' features of one checkpoint's frozen encoder (``frozen_features``)."""

    device: torch.device
    encoder: dict  # the encoder's description (``checkpoint.load_encoder``)
    splits: Splits
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    from_cache: bool  # both splits read from OUT/cache


def frozen_features(ckpt, cfg, out: Path | None, batch_size: int, bar, label: str) -> FrozenFeatures:
    """``ckpt``'s encoder as ``cfg`` asks (``use_ema``, ``random_init``, ``num_heads``, ``device``), the splits of
    ``cfg.data``, and both splits' ``cfg.pool`` features, through ``OUT/cache`` when ``cfg.cache`` (k-NN, linear probe)."""
    from lut_fast.checkpoint import load_encoder

    device = resolve_device(cfg.device)
    encoder, info = load_encoder(ckpt, use_ema=cfg.use_ema, num_heads=cfg.num_heads, random_init=cfg.random_init,
                                 random_init_seed=cfg.random_init_seed)
    splits = resolve_splits(cfg.data, cfg.val_fraction, cfg.seed)
    cache_dir = (Path(out) / "cache") if (cfg.cache and out is not None) else None
    xtr, ytr, xva, yva, from_cache = split_features(cache_dir, ckpt, info, encoder, splits, bar, label, pool=cfg.pool,
                                                    device=device, batch_size=batch_size, workers=cfg.workers,
                                                    crop_pct=cfg.crop_pct)
    return FrozenFeatures(device, info, splits, xtr, ytr, xva, yva, from_cache)


def split_features(cache_dir, ckpt_path, ckpt_info, encoder, splits, bar, label: str, **options):
    """Frozen features of both splits, through the cache: (x_train, y_train, x_val, y_val, all_from_cache)."""
    xtr, ytr, hit_tr = cached_features(cache_dir, ckpt_path, ckpt_info, encoder, splits.train, bar=bar,
                                       description=f"{label} train features", **options)
    xva, yva, hit_va = cached_features(cache_dir, ckpt_path, ckpt_info, encoder, splits.val, bar=bar,
                                       description=f"{label} val features", **options)
    return xtr, ytr, xva, yva, bool(hit_tr and hit_va)
