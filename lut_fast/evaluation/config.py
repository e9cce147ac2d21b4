"""Typed settings of ``lut-fast eval`` and ``lut-fast analyze``: one dataclass per command, one home per default.

Each command's settings are built as training's are (``lut_fast.config``): defaults (the dataclass) ->
a YAML file (``--config``) -> the command's flags (a flag left out is None = "not given") ->
``--set key=value``; then validated. ``cfg.sources`` records where each value came from;
``--print-config`` shows the resolved settings with their sources, and every result JSON holds them
(``protocol.config``, written by ``records.record_result``), so a result can be re-run from its file.

A new command follows the same pattern: one dataclass here (each field with its default and a
comment, which becomes its ``--help``; a ``validate`` method for ranges and choices); its CLI
function takes the resolved settings (``@settings_command(app, "name", TheConfig)``, from
``evaluation/command.py``, makes one option per field) and records them with
``records.record_result(..., cfg)``; its pure function (``run_knn`` etc.) takes the settings, or
keyword overrides of the defaults (``with_overrides``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from lut_fast.config import (
    SOURCE_DEFAULT, _check, _choice, _mark, _merge, _number, _scalar, apply_flags_and_sets, from_dict, read_yaml_mapping,
    to_dict,
)

POOLS = ("mean", "cls")
SPLITS = ("train", "val")

C = TypeVar("C")


# ---------------------------------------------------------------- the settings


@dataclass
class EncoderSettings:
    """Which encoder of a checkpoint, and where it runs: every command has these."""

    use_ema: bool = False  # use the momentum (target) encoder of a lut-fast checkpoint
    num_heads: Optional[int] = None  # attention heads, when the file has no config and the width is not a timm preset
    device: str = "auto"  # where it runs: auto | cpu | cuda (or cuda:N)
    # Where each value came from (filled by load_command_config); not a setting: never saved or compared.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={"recipe": False})

    def source(self, key: str) -> str:
        return self.sources.get(key, SOURCE_DEFAULT)

    def validate(self) -> None:
        _number("num_heads", self.num_heads, 1, optional=True)
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
               f"unknown device {self.device!r}; choose auto, cpu or cuda")


@dataclass
class ImageSettings(EncoderSettings):
    """Which images, and how they are read: the commands that read a dataset."""

    data: Optional[str] = None  # ImageFolder root with train/ and val/ (or one class-folder tree, split per class); None = the built-in dataset
    val_fraction: float = 0.2  # val share per class when data has no train/ and val/
    seed: int = 0  # seed of that split (and of the command's own randomness)
    workers: int = 2  # data loading processes
    crop_pct: float = 0.875  # eval transform: resize to size / crop_pct (bicubic), center crop

    def validate(self) -> None:
        super().validate()
        _number("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        _number("seed", self.seed, 0, 2**32 - 1)
        _number("workers", self.workers, 0)
        _number("crop_pct", self.crop_pct, 0, 1, low_open=True)


@dataclass
class KnnConfig(ImageSettings):
    k: int = 20  # neighbours that vote
    temperature: float = 0.07  # vote weight exp(cosine / T)
    pool: str = "cls"  # feature: the cls token (DINO / MAE protocol) or mean (of the patch tokens, LUT's pooling)
    random_init: bool = False  # baseline: the checkpoint's architecture with random weights
    random_init_seed: int = 0  # seed of those random weights (vary it to see the baseline's spread)
    batch_size: int = 128  # images per forward pass
    cache: bool = True  # keep features in OUT/cache for later runs

    def validate(self) -> None:
        super().validate()
        _number("k", self.k, 1)
        _number("temperature", self.temperature, 0, low_open=True)
        _choice("pool", self.pool, POOLS)
        _number("random_init_seed", self.random_init_seed, 0, 2**32 - 1)
        _number("batch_size", self.batch_size, 1)


LINEAR_OPTIMIZERS = ("lars", "sgd")


@dataclass
class LinearConfig(ImageSettings):
    epochs: int = 90  # epochs over the cached features (MAE: 90)
    batch_size: int = 256  # batch size of the head's training
    optimizer: str = "sgd"  # sgd (momentum 0.9) | lars (MAE's ImageNet setting, needs large batches)
    blr: float = 0.1  # base lr; lr = blr * batch / 256
    weight_decay: float = 0.0  # weight decay of the head
    warmup_epochs: float = 10  # linear warm-up epochs, then cosine
    pool: str = "cls"  # feature: the cls token (DINO / MAE protocol) or mean (of the patch tokens, LUT's pooling)
    random_init: bool = False  # baseline: the checkpoint's architecture with random weights
    random_init_seed: int = 0  # seed of those random weights (vary it to see the baseline's spread)
    feature_batch_size: int = 128  # images per forward pass while computing features
    cache: bool = True  # keep features in OUT/cache for later runs

    def validate(self) -> None:
        super().validate()
        _number("epochs", self.epochs, 1)
        _number("batch_size", self.batch_size, 1)
        _choice("optimizer", self.optimizer, LINEAR_OPTIMIZERS)
        _number("blr", self.blr, 0, low_open=True)
        _number("weight_decay", self.weight_decay, 0)
        _number("warmup_epochs", self.warmup_epochs, 0)
        _choice("pool", self.pool, POOLS)
        _number("random_init_seed", self.random_init_seed, 0, 2**32 - 1)
        _number("feature_batch_size", self.feature_batch_size, 1)


DEFAULT_RANDAUG = "rand-m9-mstd0.5-inc1"


@dataclass
class FinetuneConfig(ImageSettings):
    backend: str = "torch"  # training-view pipeline: torch | dali | ffcv
    train_data: Optional[str] = None  # training data for the backend (e.g. a converted train split); None = data
    epochs: Optional[float] = None  # None = Table D: 300 (Ti/S), 100 (B), 50 (L)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule is compressed to fit)
    batch_size: int = 64  # batch size per step (Table D: 1024 in total; use accum)
    accum: int = 1  # gradient accumulation steps
    blr: Optional[float] = None  # base lr; None = Table D: 5e-4 (Ti/S), 2.5e-4 (B), 1e-3 (L)
    lr: Optional[float] = None  # absolute peak lr (overrides blr)
    lr_scaling: str = "sqrt"  # sqrt: blr * sqrt(batch) / 8 (official) | linear: blr * batch / 256 (MAE)
    layer_decay: Optional[float] = None  # layer-wise lr decay; None = 0.75 (Ti/S), 0.65 (B, L)
    weight_decay: float = 0.05  # AdamW weight decay
    min_lr: float = 1e-6  # final lr of the cosine
    warmup_epochs: float = 5  # linear warm-up epochs
    drop_path: float = 0.1  # stochastic depth rate
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # CutMix alpha (0 = off)
    randaug: str = DEFAULT_RANDAUG  # timm RandAugment config ('none' = off)
    reprob: float = 0.25  # random erasing probability (official code; 0 = off)
    clip_grad: Optional[float] = None  # gradient norm clipping (none by default)
    pool: str = "mean"  # classify the mean of the patch tokens or the cls token
    eval_every: int = 1  # evaluate on val every N epochs (and at the end)

    def validate(self) -> None:
        super().validate()
        _choice("backend", self.backend, ("torch", "dali", "ffcv"))
        _number("epochs", self.epochs, 0, low_open=True, optional=True)
        _number("max_steps", self.max_steps, 1, optional=True)
        _number("batch_size", self.batch_size, 1)
        _number("accum", self.accum, 1)
        _number("blr", self.blr, 0, low_open=True, optional=True)
        _number("lr", self.lr, 0, low_open=True, optional=True)
        _choice("lr_scaling", self.lr_scaling, ("sqrt", "linear"))
        _number("layer_decay", self.layer_decay, 0, 1, low_open=True, optional=True)
        for name in ("weight_decay", "min_lr", "warmup_epochs", "mixup", "cutmix"):
            _number(name, getattr(self, name), 0)
        for name in ("drop_path", "smoothing", "reprob"):
            _number(name, getattr(self, name), 0, 1)
        _number("clip_grad", self.clip_grad, 0, low_open=True, optional=True)
        _choice("pool", self.pool, POOLS)
        _number("eval_every", self.eval_every, 1)
        _check(not (self.mixup > 0 or self.cutmix > 0) or self.batch_size % 2 == 0,
               f"mixup/cutmix need an even batch size, got {self.batch_size}")


@dataclass
class AttentionDistanceConfig(ImageSettings):
    split: str = "val"  # images from train or val
    max_images: int = 1000  # at most this many images (a seeded sample; 0 = all)
    labels: Optional[str] = None  # comma-separated names for the checkpoints; None = run folder names
    last: int = 3  # the table's summary column averages the last N layers
    renormalize: bool = True  # renormalise each query's attention over the patches (cls excluded)
    batch_size: int = 64  # images per forward pass

    def validate(self) -> None:
        super().validate()
        _choice("split", self.split, SPLITS)
        _number("max_images", self.max_images, 0)
        _number("last", self.last, 1)
        _number("batch_size", self.batch_size, 1)


@dataclass
class SpectrumConfig(ImageSettings):
    split: str = "val"  # images from train or val
    max_images: int = 5000  # at most this many images (a seeded sample; 0 = all)
    pool: str = "mean"  # per-image feature of each layer: mean of the patch tokens, or cls
    labels: Optional[str] = None  # comma-separated names for the checkpoints; None = run folder names
    batch_size: int = 64  # images per forward pass

    def validate(self) -> None:
        super().validate()
        _choice("split", self.split, SPLITS)
        _number("max_images", self.max_images, 0)
        _choice("pool", self.pool, POOLS)
        _number("batch_size", self.batch_size, 1)


@dataclass
class AttentionMapsConfig(EncoderSettings):
    image: Optional[str] = None  # an image file (resized and center-cropped to the model's input); required
    query: Optional[str] = None  # query patch X,Y: column,row (0-based) on the first checkpoint's grid; None = the centre
    layer: int = -1  # block whose attention is shown (0-based; -1 = last)
    labels: Optional[str] = None  # comma-separated names for the checkpoints; None = run folder names

    def validate(self) -> None:
        super().validate()
        _check(self.image is not None, "attention-maps needs an image: --image FILE")


# ---------------------------------------------------------------- building one


def load_command_config(
    cls: type[C],
    path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    flag_names: dict[str, str] | None = None,
) -> C:
    """Defaults <- YAML file ``path`` <- ``flags`` (None = not given) <- ``key=value`` strings; validated.

    ``flag_names`` maps a field to the flag that sets it, for the provenance (default ``--`` + the
    field with dashes). A YAML file may also be a result JSON of the same command: its
    ``protocol.config`` is read, so a result re-runs from its own file.
    """
    tree = to_dict(cls())
    sources: dict[str, str] = {}
    _mark(sources, "", tree, SOURCE_DEFAULT)
    if path is not None:
        loaded = read_yaml_mapping(path, "settings file")
        protocol = loaded.get("protocol")
        if isinstance(protocol, dict) and isinstance(protocol.get("config"), dict):  # a result JSON
            loaded = protocol["config"]
        _merge(tree, loaded, str(path), sources, f"YAML {path}")
    apply_flags_and_sets(tree, sources, flags, sets, flag_names)
    cfg = from_dict(cls, tree, "settings")
    cfg.sources = sources
    cfg.validate()
    return cfg


def with_overrides(cls: type[C], cfg: C | None, overrides: dict[str, Any]) -> C:
    """``cfg`` (or the defaults) with keyword ``overrides`` of its fields, validated: for the Python API."""
    base = cfg if cfg is not None else cls()
    if not isinstance(base, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(base).__name__}")
    try:
        out = dataclasses.replace(base, **overrides) if overrides else base
    except TypeError as e:
        raise TypeError(f"{cls.__name__}: {e}") from None
    if overrides:
        out.sources = {**base.sources, **{k: "keyword argument" for k in overrides}}
    out.validate()
    return out


def format_settings(cfg: Any, command: str) -> str:
    """The resolved settings as YAML, each value followed by ``# where it came from`` (``--print-config``)."""
    lines = [f"# lut-fast {command}: the resolved settings; after each value, where it came from"]
    for key, value in to_dict(cfg).items():
        lines.append(f"{key}: {_scalar(value)}  # {cfg.source(key)}")
    return "\n".join(lines) + "\n"


def default_of(cls: type, name: str) -> Any:
    """A field's default, for help texts (the dataclass is its only home)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def field_comment(cls: type, name: str) -> str:
    """The comment after a field in its dataclass (the help text's one home)."""
    import inspect
    import re

    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(rf"\s+{name}:[^#]*#\s*(.*)$", line)
            if m:
                return m.group(1)
    return ""


def option(cls: type, name: str, *decls: str, help: str | None = None) -> Any:
    """A typer option for field ``name`` of ``cls``: default None ("not given"), help from the field's comment.

    The help ends with the dataclass default, so ``--help`` shows it while the dataclass stays its only home.
    """
    import typer

    default = default_of(cls, name)
    text = help if help is not None else field_comment(cls, name)
    text = text[:1].upper() + text[1:]
    shown = "none" if default is None else ("on" if default is True else "off" if default is False else default)
    return typer.Option(None, *decls, help=f"{text}  (default: {shown})")
