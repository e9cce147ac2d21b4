"""The whole training recipe as typed dataclasses: the single source of defaults.

A run's config is built as: defaults -> YAML file -> CLI flags -> ``--set key=value``,
then validated. It is printed at start and saved as ``config.yaml`` beside the
checkpoints (and inside each checkpoint). The README's table is checked
against these defaults by a test.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lut_fast.errors import UserError
from lut_fast.pipelines.spec import AugSpec

METHODS = ("lut", "mae")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
DIRECTIONS = ("symmetric", "one_way")
LR_RULES = ("sqrt", "linear")


@dataclass
class ModelConfig:
    name: str = "vit_tiny"  # vit_tiny | vit_small | vit_base | vit_large
    img_size: int = 224  # input resolution (any multiple of patch_size)
    patch_size: int = 16  # ViT patch size
    depth: Optional[int] = None  # override the preset's encoder depth (small/fast runs)
    embed_dim: Optional[int] = None  # override the preset's width
    num_heads: Optional[int] = None  # override the preset's heads
    decoder_embed_dim: int = 512  # MAE decoder width
    decoder_depth: int = 8  # MAE decoder blocks
    decoder_num_heads: int = 16  # MAE decoder heads
    mask_ratio: float = 0.75  # K = int(L * (1 - r)) visible patches per view
    norm_pix_loss: bool = True  # per-patch normalised pixel targets
    head_hidden_dim: int = 4096  # LUT projector / predictor hidden width


@dataclass
class LUTConfig:
    lam: Optional[float] = None  # weight of the bc loss; None = 1.0 for tiny/small, 0.25 for base/large
    direction: str = "symmetric"  # symmetric (official) | one_way (paper text, cheaper)
    ema_momentum: float = 0.996  # start of the cosine momentum schedule
    ema_momentum_end: float = 1.0  # momentum at the last optimizer step

    def resolved_lam(self, model_name: str) -> float:
        if self.lam is not None:
            return self.lam
        return 1.0 if model_name in ("vit_tiny", "vit_small") else 0.25


@dataclass
class DataConfig:
    path: Optional[str] = None  # None = the built-in dataset
    backend: str = "torch"  # torch | dali | ffcv
    num_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))  # loader processes (torch) or threads (DALI, FFCV)
    photometric_on: str = "auto"  # view 2's jitter + 3-augment: loader (CPU) | device (batched after the copy) | auto (device on CUDA)
    max_bad_images: int = 100  # unreadable images tolerated (skipped, counted) before stopping
    channels_last: bool = True  # channels-last batches on CUDA (faster patch embedding)
    ffcv_order: str = "random"  # FFCV: random / quasi_random (data larger than RAM) / sequential
    ffcv_os_cache: bool = True  # FFCV: let the OS page cache hold the .beton (False for data larger than RAM)
    dali_shuffle_buffer: int = 4096  # DALI: reader shuffle buffer (samples)

    def backend_options(self) -> dict:
        """The options of the chosen backend, as ``build_loader`` keyword arguments."""
        return {
            "torch": {},
            "ffcv": {"order": self.ffcv_order, "os_cache": self.ffcv_os_cache},
            "dali": {"shuffle_buffer": self.dali_shuffle_buffer},
        }[self.backend]


@dataclass
class OptimConfig:
    batch_size: int = 64  # per device
    accum_steps: int = 1  # micro-batches per optimizer step
    blr: float = 1.5e-4  # base lr; lr = blr * sqrt(eff_batch) / 4 (sqrt) or blr * eff_batch / 256 (linear)
    lr: Optional[float] = None  # absolute lr, overrides blr scaling
    lr_scaling: str = "sqrt"  # sqrt (official LUT) | linear (MAE)
    weight_decay: float = 0.05  # AdamW; none on biases and 1-D parameters
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    epochs: float = 1600  # schedule length (the paper: 1600; ablations 400)
    warmup_epochs: float = 40  # linear warm-up, then half-cycle cosine
    max_steps: Optional[int] = None  # cap on optimizer steps; the schedule is compressed to fit
    min_lr: float = 0.0  # end of the cosine
    clip_grad: Optional[float] = None  # the recipe uses none


@dataclass
class RunConfig:
    out_dir: Optional[str] = None  # default runs/<method>_<model>
    device: str = "auto"  # auto / cpu / cuda
    precision: str = "auto"  # auto: bf16 on bf16 GPUs, fp16 + loss scaling on older GPUs, fp32 on CPU
    compile: bool = False  # torch.compile the student
    seed: int = 0  # data order, augmentations, masks and init all derive from it
    log_every: int = 10  # optimizer steps between metric lines (and NaN checks)
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # step files kept (last.pt points at the newest)
    max_hours: Optional[float] = None  # wall-clock budget; ends with a checkpoint
    progress: bool = True  # progress bar on a terminal; false (or stdout not a terminal): a plain line every log_every steps


@dataclass
class TrainConfig:
    method: str = "lut"  # lut | mae
    model: ModelConfig = field(default_factory=ModelConfig)
    lut: LUTConfig = field(default_factory=LUTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugSpec = field(default_factory=AugSpec)  # recipe and img_size follow method and model
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir or f"runs/{self.method}_{self.model.name}")


# ---------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if origin is typing.Union and type(None) in args:
            return None
        raise UserError(f"{where} may not be empty")
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be of type {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(sorted(unknown))} in {where}; valid: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            raise UserError(f"unknown config section {k!r} in {dotted!r}")
        node = node[k]
    if keys[-1] not in node:
        raise UserError(f"unknown config field {dotted!r}")
    node[keys[-1]] = value


def load_config(
    path: str | os.PathLike | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> TrainConfig:
    """Defaults <- YAML <- flags (None = not given) <- ``key=value`` strings; validated."""
    tree = to_dict(TrainConfig())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping")
        _merge(tree, loaded, str(p))
    for key, value in (flags or {}).items():
        if value is not None:
            _set_path(tree, key, value)
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set takes key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    # The augmentation recipe and size follow the method and the model.
    tree["aug"]["recipe"] = "mae" if tree["method"] == "mae" else "lut"
    tree["aug"]["img_size"] = tree["model"]["img_size"]
    cfg = from_dict(TrainConfig, tree)
    validate(cfg)
    return cfg


def _merge(base: dict, new: dict, where: str) -> None:
    for k, v in new.items():
        if k not in base:
            raise UserError(f"unknown config field {k!r} in {where}; valid: {', '.join(base)}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, f"{where}:{k}")
        else:
            base[k] = v


def validate(cfg: TrainConfig) -> None:
    from lut_fast.models.vit import PRESETS

    m, o = cfg.model, cfg.optim

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    check(cfg.method in METHODS, f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    check(m.name in PRESETS, f"unknown model {m.name!r}; choose one of {', '.join(PRESETS)}")
    check(m.img_size > 0 and m.patch_size > 0, "image size and patch size must be positive")
    check(m.img_size % m.patch_size == 0, f"image size {m.img_size} is not divisible by patch size {m.patch_size}")
    check(0.0 < m.mask_ratio < 1.0, f"mask ratio must be in (0, 1), got {m.mask_ratio}")
    num_patches = (m.img_size // m.patch_size) ** 2
    keep = int(num_patches * (1 - m.mask_ratio))
    check(keep >= 1, f"mask ratio {m.mask_ratio} leaves no visible patch out of {num_patches}")
    if cfg.method == "lut":
        check(2 * keep <= num_patches, f"LUT needs two disjoint visible sets: mask ratio {m.mask_ratio} must be >= 0.5")
    check(o.batch_size > 0, f"batch size must be positive, got {o.batch_size}")
    check(o.accum_steps >= 1, f"accumulation steps must be >= 1, got {o.accum_steps}")
    check(o.epochs > 0, f"epochs must be positive, got {o.epochs}")
    check(o.max_steps is None or o.max_steps > 0, f"max steps must be positive, got {o.max_steps}")
    check(0 <= o.warmup_epochs <= o.epochs, "warmup epochs must be between 0 and epochs")
    check(o.lr_scaling in LR_RULES, f"unknown lr scaling {o.lr_scaling!r}; choose sqrt or linear")
    check(cfg.lut.direction in DIRECTIONS, f"unknown LUT direction {cfg.lut.direction!r}; choose symmetric or one_way")
    check(cfg.run.precision in PRECISIONS, f"unknown precision {cfg.run.precision!r}; choose {', '.join(PRECISIONS)}")
    check(cfg.run.device in DEVICES, f"unknown device {cfg.run.device!r}; choose {', '.join(DEVICES)}")
    check(cfg.data.backend in ("torch", "dali", "ffcv"), f"unknown backend {cfg.data.backend!r}; choose torch, dali or ffcv")
    check(cfg.data.num_workers >= 0, "num_workers must be >= 0")
    check(cfg.run.log_every >= 1 and cfg.run.ckpt_every >= 1, "log_every and ckpt_every must be >= 1")
    embed = m.embed_dim or PRESETS[m.name]["embed_dim"]
    heads = m.num_heads or PRESETS[m.name]["num_heads"]
    check(embed % heads == 0, f"embed dim {embed} is not divisible by {heads} heads")
    check(m.decoder_embed_dim % m.decoder_num_heads == 0, "decoder embed dim must be divisible by decoder heads")


# ---------------------------------------------------------------- documentation


def defaults_table() -> str:
    """Markdown table of every config field, its default and its comment, read from this file.

    The README embeds this table; a test checks that it is current
    (regenerate with ``python -m lut_fast.config``).
    """
    import inspect
    import re

    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    sections = [("", TrainConfig)] + [
        (f.name + ".", f.default_factory) for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory)
    ]
    for prefix, cls in sections:
        comments = {}
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+):[^#]*(?:#\s*(.*))?$", line)
            if m:
                comments[m.group(1)] = (m.group(2) or "").replace("|", "/")
        defaults = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                continue
            value = getattr(defaults, f.name)
            if f.name == "num_workers":
                value = "min(8, CPU count)"
            rows.append(f"| `{prefix}{f.name}` | `{value}` | {comments.get(f.name, '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(defaults_table())
