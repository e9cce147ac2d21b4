"""The whole training recipe as typed dataclasses: the single source of defaults.

A run's config is built as: defaults -> YAML file -> CLI flags -> ``--set key=value``,
then the defaults of the chosen method (``METHOD_DEFAULTS``) fill whatever the user did
not set, then it is validated. ``TrainConfig.sources`` records where each value came
from (``cfg.source(key)``, ``cfg.user_set(key)``); the header printed at start and
``lut-fast train --print-config`` show it. The config is saved as ``config.yaml``
beside the checkpoints (and inside each checkpoint). The README's table is checked
against these defaults by a test; docs/METHOD.md explains every recipe value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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
    torch_workers: str = "auto"  # torch backend: threads (in the trainer, reused buffers) | processes | auto (threads up to 8 workers)
    ffcv_order: str = "random"  # FFCV: random / quasi_random (data larger than RAM) / sequential
    ffcv_os_cache: bool = True  # FFCV: let the OS page cache hold the .beton (False for data larger than RAM)
    dali_shuffle_buffer: int = 4096  # DALI: reader shuffle buffer (samples)

    def backend_options(self) -> dict:
        """The options of the chosen backend, as ``build_loader`` keyword arguments."""
        return {
            "torch": {"workers": self.torch_workers},
            "ffcv": {"order": self.ffcv_order, "os_cache": self.ffcv_os_cache},
            "dali": {"shuffle_buffer": self.dali_shuffle_buffer},
        }[self.backend]


@dataclass
class OptimConfig:
    batch_size: int = 64  # per device
    accum_steps: int = 1  # micro-batches per optimizer step
    blr: float = 1.5e-4  # base lr; lr = blr * sqrt(eff_batch) / 4 (sqrt) or blr * eff_batch / 256 (linear)
    lr: Optional[float] = None  # absolute lr, overrides blr scaling
    lr_scaling: str = "sqrt"  # sqrt (official LUT) | linear (MAE); follows --method unless set
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
    progress: bool = True  # rich progress bar on the main process


@dataclass
class TrainConfig:
    method: str = "lut"  # lut | mae
    model: ModelConfig = field(default_factory=ModelConfig)
    lut: LUTConfig = field(default_factory=LUTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugSpec = field(default_factory=AugSpec)  # recipe and img_size follow method and model
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Where each value came from, by dotted key (filled by ``load_config``). Not part of the
    # recipe: never saved, never compared, not in the README table.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={"recipe": False})

    def source(self, key: str) -> str:
        """Where ``key`` (e.g. ``optim.lr_scaling``) came from: see ``SOURCE_DEFAULT`` and ``load_config``."""
        return self.sources.get(key, SOURCE_DEFAULT)

    def user_set(self, key: str) -> bool:
        """True when the user chose ``key`` (YAML, a flag or ``--set``); for a section (``optim``), any key in it.

        False for the dataclass defaults, the method's defaults and derived values, so later code
        may adapt those (e.g. a smaller recipe on CPU) without overriding a choice the user made.
        """
        keys = [k for k in self.sources if k == key or k.startswith(key + ".")]
        return any(is_user_source(self.sources[k]) for k in keys)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir or f"runs/{self.method}_{self.model.name}")


# ---------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict:
    """The recipe as plain YAML-able data (fields marked ``recipe: False``, like ``sources``, left out)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = plain(dataclasses.asdict(cfg))
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("recipe", True):
            out.pop(f.name, None)
    return out


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
    flag_names: dict[str, str] | None = None,
) -> TrainConfig:
    """Defaults <- YAML <- flags (None = not given) <- ``key=value`` strings <- the method's defaults
    for what none of these set; validated. ``cfg.sources`` says where each value came from.

    ``flag_names`` maps a config key to the flag that sets it, for the provenance (default:
    ``--`` + the key's last part, e.g. ``optim.batch_size`` -> ``--batch-size``).
    """
    tree = to_dict(TrainConfig())
    sources: dict[str, str] = {}
    _mark(sources, "", tree, SOURCE_DEFAULT)
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
        _merge(tree, loaded, str(p), sources, f"YAML {p}")
    for key, value in (flags or {}).items():
        if value is not None:
            _set_path(tree, key, value)
            _replace_marks(sources, key, value, f"flag {(flag_names or {}).get(key) or _flag_name(key)}")
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set takes key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        _set_path(tree, key.strip(), value)
        _replace_marks(sources, key.strip(), value, SOURCE_SET)
    apply_method_defaults(tree, sources)
    cfg = from_dict(TrainConfig, tree)
    cfg.sources = sources
    validate(cfg)
    return cfg


def _merge(base: dict, new: dict, where: str, sources: dict[str, str], label: str, prefix: str = "") -> None:
    for k, v in new.items():
        if k not in base:
            raise UserError(f"unknown config field {k!r} in {where}; valid: {', '.join(base)}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, f"{where}:{k}", sources, label, f"{prefix}{k}.")
        else:
            base[k] = v
            _mark(sources, prefix + k, v, label)


# ---------------------------------------------------------------- per-method defaults and provenance

# The two official recipes (LUT's released pre-training script and MAE's, with the commands their
# READMEs give) agree on blr 1.5e-4, AdamW betas (0.9, 0.95), weight decay 0.05, 40 warm-up epochs,
# half-cycle cosine to 0, mask ratio 0.75, norm_pix_loss, the decoder and an effective batch of 4096.
# They differ in what is below; the dataclass defaults above are LUT's. A value the user set (YAML,
# flag, --set) always wins. Epochs are deliberately NOT here: MAE's released command trains 800 epochs
# (ViT-L), but the LUT paper compares both methods at equal epochs (1600, and 400 in ablations), so
# switching --method keeps the budget equal. docs/METHOD.md, "The two recipes", lists every value.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lut": {
        "optim.lr_scaling": "sqrt",  # lr = blr * sqrt(eff_batch) / 4
        "aug.recipe": "lut",  # two views: simple random crop; view 2 adds jitter and one of 3 ops
    },
    "mae": {
        "optim.lr_scaling": "linear",  # lr = blr * eff_batch / 256
        "aug.recipe": "mae",  # one view: RandomResizedCrop(scale 0.2..1) + flip
    },
}

SOURCE_DEFAULT = "default"  # the dataclass default
SOURCE_SET = "--set"
SOURCE_DERIVED_IMG_SIZE = "follows model.img_size"
_USER_PREFIXES = ("YAML ", "flag ", SOURCE_SET)


def method_source(method: str) -> str:
    return f"default of method {method}"


def is_user_source(source: str) -> bool:
    """A value the user chose: from a YAML file, a flag or ``--set``."""
    return source.startswith(_USER_PREFIXES)


def _flag_name(key: str) -> str:
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def _mark(sources: dict[str, str], key: str, value: Any, label: str) -> None:
    """Record ``label`` for ``key``; a mapping marks each leaf under it."""
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(sources, f"{key}.{k}" if key else k, v, label)
    else:
        sources[key] = label


def _replace_marks(sources: dict[str, str], key: str, value: Any, label: str) -> None:
    """A flag or ``--set`` replaces ``key`` whole: a mapping drops what was set under it before."""
    if isinstance(value, dict):
        for k in [k for k in sources if k.startswith(key + ".")]:
            sources[k] = SOURCE_DEFAULT
    _mark(sources, key, value, label)


def apply_method_defaults(tree: dict, sources: dict[str, str]) -> None:
    """Fill the method-dependent values the user did not set, and derive ``aug.img_size``."""
    if not all(isinstance(tree.get(s), dict) for s in ("model", "aug", "optim")):
        return  # a section replaced by a non-mapping: from_dict reports it in one line
    method = tree.get("method")
    for key, value in (METHOD_DEFAULTS.get(method, {}) if isinstance(method, str) else {}).items():
        if not is_user_source(sources.get(key, SOURCE_DEFAULT)):
            section, name = key.split(".")
            tree[section][name] = value
            sources[key] = method_source(method)
    # The views are made at the model's input size; a different aug.img_size cannot train.
    size = tree["model"].get("img_size", ModelConfig.img_size)
    if is_user_source(sources.get("aug.img_size", SOURCE_DEFAULT)) and tree["aug"].get("img_size") != size:
        raise UserError(
            f"aug.img_size {tree['aug']['img_size']} differs from model.img_size {size}: "
            "set model.img_size (--img-size); the views follow it"
        )
    tree["aug"]["img_size"] = size
    if not is_user_source(sources.get("aug.img_size", SOURCE_DEFAULT)):
        sources["aug.img_size"] = SOURCE_DERIVED_IMG_SIZE


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


_PLAIN_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "none", "~", ""}


def _scalar(value: Any) -> str:
    """A value as YAML writes it on one line (lists in flow style), so ``--print-config`` loads back.

    Hand-written rather than ``yaml.safe_dump``: the GPU check imports this module with a JSON
    stand-in for PyYAML, and one line per value is wanted either way.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 reads 1e-06 as a string; 1.0e-06 is a float
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_/][\w./-]*", value) and value.lower() not in _PLAIN_YAML_WORDS
        return value if plain else json.dumps(value)
    return str(value)


def lr_description(cfg: TrainConfig, eff_batch: int, peak_lr: float) -> str:
    """``lr 3.75e-05 (linear rule: blr 0.00015 x 64 / 256; rule: default of method mae)``, or who set optim.lr."""
    o = cfg.optim

    def source(key: str) -> str:  # a config read back from a checkpoint carries no provenance
        return cfg.source(key) if cfg.sources else "as saved in the run's config"

    if o.lr is not None:
        return f"lr {peak_lr:.3g} (set by optim.lr: {source('optim.lr')})"
    formula = f"x sqrt({eff_batch}) / 4" if o.lr_scaling == "sqrt" else f"x {eff_batch} / 256"
    return f"lr {peak_lr:.3g} ({o.lr_scaling} rule: blr {o.blr:g} {formula}; rule: {source('optim.lr_scaling')})"


def source_lines(cfg: TrainConfig, width: int = 100) -> list[str]:
    """The values that are not plain defaults, grouped by where they came from (for the run header).

    Always lists the method-dependent values (``METHOD_DEFAULTS``), then every value whose source is
    not the dataclass default: a YAML file, a flag, ``--set``, or a label later code recorded in
    ``cfg.sources`` (e.g. a default chosen for the device). Empty when the config was not made by
    ``load_config`` (e.g. read back from a checkpoint).
    """
    if not cfg.sources:
        return []
    values = dict(_leaves(to_dict(cfg)))
    groups: dict[str, list[str]] = {}
    for key, value in values.items():
        src = cfg.source(key)
        if key in METHOD_DEFAULTS.get(cfg.method, {}) or src not in (SOURCE_DEFAULT, SOURCE_DERIVED_IMG_SIZE):
            # One group for all flags (each flag's name is in --print-config); one per other source.
            groups.setdefault("flags" if src.startswith("flag ") else src, []).append(f"{key}={_scalar(value)}")

    def rank(src: str) -> int:  # the order they are applied: defaults of the method (or others), YAML, flags, --set
        return next((i for i, p in enumerate(("YAML ", "flags", SOURCE_SET), 1) if src.startswith(p)), 0)

    lines = []
    for src, items in sorted(groups.items(), key=lambda kv: rank(kv[0])):
        line, filled = f"  {src}: ", False
        for item in items:
            if filled and len(line) + len(item) + 2 > width:
                lines.append(line.rstrip())
                line, filled = "    ", False  # continuation: a fixed indent, however long the source's name
            line, filled = line + item + ", ", True
        lines.append(line.rstrip(", "))
    return lines


def format_resolved(cfg: TrainConfig, world_size: int = 1) -> str:
    """The resolved config as YAML, each value followed by ``# where it came from`` (``--print-config``).

    The output loads back as a config file (the comments are ignored).
    """
    lines = ["# lut-fast: the resolved config; after each value, where it came from"]
    stack: list[str] = []
    for key, value in _leaves(to_dict(cfg)):
        parts = key.split(".")
        common = 0
        while common < min(len(stack), len(parts) - 1) and stack[common] == parts[common]:
            common += 1
        stack = stack[:common]
        for depth in range(common, len(parts) - 1):
            lines.append("  " * depth + parts[depth] + ":")
            stack.append(parts[depth])
        lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}: {_scalar(value)}  # {cfg.source(key)}")
    from lut_fast.optim import scaled_lr

    o = cfg.optim
    eff_batch = o.batch_size * o.accum_steps * world_size
    peak = o.lr if o.lr is not None else scaled_lr(o.blr, eff_batch, o.lr_scaling)
    lines.append(f"# derived, at {world_size} process(es): effective batch {eff_batch}, {lr_description(cfg, eff_batch, peak)}")
    out_src = cfg.source("run.out_dir") if cfg.run.out_dir else "from method and model"
    lines.append(f"# derived: output folder {cfg.out_dir} ({out_src})")
    if cfg.method == "lut":
        lam_src = cfg.source("lut.lam") if cfg.lut.lam is not None else f"by model size ({cfg.model.name})"
        lines.append(f"# derived: lambda {cfg.lut.resolved_lam(cfg.model.name):g} ({lam_src})")
    return "\n".join(lines) + "\n"


def validate(cfg: TrainConfig) -> None:
    from lut_fast.models.vit import PRESETS

    m, o = cfg.model, cfg.optim

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    check(cfg.method in METHODS, f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    check(
        cfg.method != "lut" or cfg.aug.two_views,
        f"aug.recipe={cfg.aug.recipe} makes one view, LUT needs two: leave aug.recipe to follow the method",
    )
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
    check(cfg.data.torch_workers in ("auto", "threads", "processes"),
          f"data.torch_workers must be auto, threads or processes, got {cfg.data.torch_workers!r}")
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
            if not f.metadata.get("recipe", True):
                continue
            value = getattr(defaults, f.name)
            if f.name == "num_workers":
                value = "min(8, CPU count)"
            rows.append(f"| `{prefix}{f.name}` | `{value}` | {comments.get(f.name, '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(defaults_table())
