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
from lut_fast.pipelines.batch import PHOTOMETRIC_PLACES
from lut_fast.pipelines.contract import check_aug_support
from lut_fast.pipelines.spec import STRONG_OPS, AugSpec

METHODS = ("lut", "mae", "simmim", "lut_simmim")
SIMMIM_METHODS = ("simmim", "lut_simmim")  # block-wise masking, mask tokens in the encoder
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
DIRECTIONS = ("symmetric", "one_way")
LR_RULES = ("sqrt", "linear")
BACKENDS = ("torch", "dali", "ffcv")
FFCV_ORDERS = ("random", "quasi_random", "sequential")
PADDING_MODES = ("reflect", "constant", "edge", "symmetric")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


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
    mask_ratio: float = 0.75  # K = int(L * (1 - r)) visible patches per view (SimMIM methods: ceil(blocks * r) masked blocks)
    norm_pix_loss: bool = True  # per-patch normalised pixel targets
    head_hidden_dim: int = 4096  # LUT projector / predictor hidden width
    mask_patch_size: Optional[int] = None  # simmim / lut_simmim: side in pixels of a masked block; None = 2 x patch_size (32 px at patch 16, as SimMIM's ViT)

    def resolved_mask_patch_size(self) -> int:
        return self.mask_patch_size if self.mask_patch_size is not None else 2 * self.patch_size


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


def default_num_workers() -> int:
    """The loader's default parallelism, for the machine this runs on.

    Without CUDA: the core count, at most 8. With CUDA: the cores each local
    training process has (torchrun's LOCAL_WORLD_SIZE, else one process per
    GPU) minus one for the process itself. On a GPU node more workers feed
    more images per second (an H200 with 16 cores: LUT batches for a compiled
    ViT-B step came at 1,843 img/s from 8 loader threads, 3,088 from 14
    processes), and above 8 the torch backend's ``auto`` workers are
    processes, which scale past the GIL.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    import torch

    if not torch.cuda.is_available():
        return max(1, min(8, cores))
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or torch.cuda.device_count() or 1
    return max(1, cores // local - 1)


@dataclass
class DataConfig:
    path: Optional[str] = None  # None = the built-in dataset
    backend: str = "torch"  # torch | dali | ffcv
    num_workers: int = field(default_factory=default_num_workers)  # loader threads / processes (torch: see torch_workers), or DALI / FFCV threads
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
    progress: bool = True  # progress bar on a terminal; false (or stdout not a terminal): a plain line every log_every steps
    knn_every: int = 0  # optimizer steps between online k-NN checks of the encoder (and one at the end); 0 = off
    knn_data: Optional[str] = None  # split root (train/ and val/) for those checks; None = data.path if it has val/, else the built-in data
    knn_bank: int = 2000  # at most this many train images in the k-NN feature bank (a seeded sample; 0 = all)
    knn_val: int = 1000  # at most this many val images scored per check (0 = all)
    tensorboard: Optional[bool] = None  # event files in OUT/tensorboard: None = if the tensorboard package is installed, true = required, false = off
    wandb: bool = False  # also log to Weights & Biases (extra: lut-fast[wandb]; WANDB_MODE=offline needs no network)
    wandb_project: str = "lut-fast"  # W&B project name
    curves: bool = True  # write OUT/curves.png (lut-fast plot) when training ends


@dataclass
class TrainConfig:
    method: str = "lut"  # lut | mae | simmim | lut_simmim
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
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise UserError(f"{where} must have {len(args)} values, got {len(value)}: {list(value)!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if isinstance(value, bool) and tp in (int, float):
        raise UserError(f"{where} must be of type {tp.__name__}, got {value!r}")
    if isinstance(value, (list, dict)) and tp in (int, float, str, bool):
        raise UserError(f"{where} must be of type {tp.__name__}, got {value!r}")
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
        raise UserError(f"unknown config field {dotted!r}; valid: {', '.join(node)}")
    node[keys[-1]] = value


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """The mapping a YAML file holds; a missing file, bad YAML or a non-mapping is a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{what} {p} must hold a mapping")
    return loaded


def apply_flags_and_sets(tree: dict, sources: dict[str, str], flags: dict[str, Any] | None, sets: list[str] | None,
                         flag_names: dict[str, str] | None = None) -> None:
    """Flags (None = not given) then ``key=value`` strings (YAML values) onto ``tree``, recording each one's source."""
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


def load_config(
    path: str | os.PathLike | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    flag_names: dict[str, str] | None = None,
    cpu_recipe: bool = False,
) -> TrainConfig:
    """Defaults <- YAML <- flags (None = not given) <- ``key=value`` strings <- the method's defaults
    for what none of these set; validated. ``cfg.sources`` says where each value came from.

    ``flag_names`` maps a config key to the flag that sets it, for the provenance (default:
    ``--`` + the key's last part, e.g. ``optim.batch_size`` -> ``--batch-size``).
    ``cpu_recipe``: on a CPU-only run where no model setting was chosen, start
    from the small CPU recipe instead of the ImageNet one (``apply_cpu_recipe``).
    """
    tree = to_dict(TrainConfig())
    sources: dict[str, str] = {}
    _mark(sources, "", tree, SOURCE_DEFAULT)
    if path is not None:
        loaded = read_yaml_mapping(path)
        _merge(tree, loaded, str(path), sources, f"YAML {path}")
    apply_flags_and_sets(tree, sources, flags, sets, flag_names)
    explicit = {k for k, src in sources.items() if is_user_source(src)}
    note = apply_cpu_recipe(tree, explicit, sources) if cpu_recipe else ""
    apply_method_defaults(tree, sources)
    cfg = from_dict(TrainConfig, tree)
    cfg.sources = sources
    validate(cfg)
    cfg.recipe_note = note  # not a field (not saved): the header says why the recipe differs from the defaults
    return cfg


# The small recipe `make demo` runs (configs/demo.yaml, checked by a test): a few minutes on 2 CPU cores,
# where the ImageNet recipe (224 px, 8-block decoder) would run at about one image per second.
CPU_RECIPE: dict[str, Any] = {
    "model.name": "vit_tiny", "model.img_size": 64, "model.patch_size": 8, "model.depth": 4,
    "model.decoder_embed_dim": 128, "model.decoder_depth": 2, "model.decoder_num_heads": 4,
    "model.head_hidden_dim": 512, "lut.lam": 1.0, "optim.batch_size": 64, "optim.lr": 1.0e-3,
    "optim.epochs": 20, "optim.warmup_epochs": 2, "run.log_every": 5, "run.ckpt_every": 50,
}
# A recipe value is not used when the user chose one of these instead (an explicit blr means "scale the lr").
_CPU_RECIPE_YIELDS_TO = {"optim.lr": ("optim.blr",), "optim.warmup_epochs": ("optim.epochs",)}


CPU_RECIPE_SOURCE = "CPU recipe (a CPU run, no model chosen)"


def apply_cpu_recipe(tree: dict, explicit: set[str], sources: dict[str, str] | None = None) -> str:
    """Switch a config tree to ``CPU_RECIPE`` when the run will be on a CPU and no model setting was chosen.

    ``explicit``: the dotted keys the user set (YAML, flags, ``--set``); those
    are never changed. ``sources`` (key -> where its value came from), when
    given, records ``CPU_RECIPE_SOURCE`` for each value changed. Returns the
    line the header prints ("" when nothing changed).
    """
    if any(k.startswith("model.") or k == "aug.img_size" for k in explicit):
        return ""
    device = tree["run"]["device"]
    if device == "cuda":
        return ""
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return ""
    for key, value in CPU_RECIPE.items():
        if key in explicit or any(k in explicit for k in _CPU_RECIPE_YIELDS_TO.get(key, ())):
            continue
        _set_path(tree, key, value)
        if sources is not None:
            sources[key] = CPU_RECIPE_SOURCE
    if "optim.epochs" in explicit and "optim.warmup_epochs" not in explicit:
        tree["optim"]["warmup_epochs"] = tree["optim"]["epochs"] / 10  # the recipe's share
        if sources is not None:
            sources["optim.warmup_epochs"] = CPU_RECIPE_SOURCE
    m = tree["model"]
    return (
        f"a CPU run and no model chosen: the small CPU recipe of `make demo` ({m['name']}, {m['depth']} blocks, "
        f"{m['img_size']}px/p{m['patch_size']}); for the ImageNet recipe choose the model, e.g. --model vit_base"
    )


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
    # SimMIM's ViT-B pre-training recipe: its official config for ViT-B at 224 px
    # (simmim_pretrain__vit_base__img224__800ep.yaml) and the defaults of its config.py.
    # docs/METHOD.md, "LUT on SimMIM", lists what is kept, what differs and why.
    "simmim": {
        "model.mask_ratio": 0.6,  # DATA.MASK_RATIO; blocks of 32 px (model.mask_patch_size)
        "optim.lr_scaling": "linear",  # its main script scales BASE_LR by total batch / 512 ...
        "optim.blr": 5.0e-5,  # ... with BASE_LR 1e-4: 1e-4 per 512 images = 5e-5 per 256
        "optim.betas": (0.9, 0.999),  # TRAIN.OPTIMIZER.BETAS
        "optim.warmup_epochs": 10,  # TRAIN.WARMUP_EPOCHS
        "optim.clip_grad": 5.0,  # TRAIN.CLIP_GRAD
        "aug.recipe": "mae",  # one RandomResizedCrop view + flip ...
        "aug.rrc_scale": (0.67, 1.0),  # ... at SimMIM's scale 0.67..1 (ratio 3/4..4/3, as MAE's)
    },
    # LUT on SimMIM: SimMIM's masking and optimisation (so lambda = 0 is the simmim run), LUT's two views.
    "lut_simmim": {
        "model.mask_ratio": 0.6,
        "optim.lr_scaling": "linear",
        "optim.blr": 5.0e-5,
        "optim.betas": (0.9, 0.999),
        "optim.warmup_epochs": 10,
        "optim.clip_grad": 5.0,
        "aug.recipe": "lut",  # view 1 SRC, view 2 SRC + LUT's jitter and one of 3 ops (the target's view)
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
        # The small CPU recipe (e.g. its 2 warm-up epochs of 20) is kept like a user's value.
        if not is_user_source(sources.get(key, SOURCE_DEFAULT)) and sources.get(key) != CPU_RECIPE_SOURCE:
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
    if cfg.method in ("lut", "lut_simmim"):
        lam_src = cfg.source("lut.lam") if cfg.lut.lam is not None else f"by model size ({cfg.model.name})"
        lines.append(f"# derived: lambda {cfg.lut.resolved_lam(cfg.model.name):g} ({lam_src})")
    return "\n".join(lines) + "\n"


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def _number(where: str, value: Any, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """``value`` is a finite number in the range (NaN and inf fail every range); None only if ``optional``."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        def fmt(x: float) -> str:
            return str(x) if isinstance(x, int) else f"{x:g}"

        if low is not None and high is not None:
            rng = f"in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
        elif low is not None:
            rng = f"{'>' if low_open else '>='} {fmt(low)}"
        else:
            rng = f"{'<' if high_open else '<='} {fmt(high)}"
        raise UserError(f"{where} must be a finite number {rng}, got {value!r}")


def _choice(where: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"unknown {where} {value!r}; choose one of {', '.join(map(str, choices))}")


def validate_aug(a: AugSpec, where: str = "aug") -> None:
    """Every augmentation field's length and range (AugSpec calls this on creation, so backends get it too)."""
    _choice(f"{where}.recipe", a.recipe, ("lut", "mae"))
    _number(f"{where}.img_size (image size)", a.img_size, 0, low_open=True)
    _number(f"{where}.src_padding", a.src_padding, 0)
    _check(a.src_padding < a.img_size, f"{where}.src_padding {a.src_padding} must be smaller than the image size {a.img_size}")
    _choice(f"{where}.src_padding_mode", a.src_padding_mode, PADDING_MODES)
    _choice(f"{where}.interpolation", a.interpolation, INTERPOLATIONS)
    for name in ("flip_p", "jitter_p"):
        _number(f"{where}.{name}", getattr(a, name), 0, 1)
    for name in ("brightness", "contrast", "saturation"):
        _number(f"{where}.{name}", getattr(a, name), 0)
    _number(f"{where}.hue", a.hue, 0, 0.5)
    unknown = set(a.strong_ops) - set(STRONG_OPS)
    _check(not unknown and bool(a.strong_ops), f"{where}.strong_ops must be a non-empty subset of {STRONG_OPS}, got {a.strong_ops}")
    _number(f"{where}.solarize_threshold", a.solarize_threshold, 0, 256)
    for name, low, high in (("blur_sigma", 0, None), ("rrc_scale", 0, 1), ("rrc_ratio", 0, None)):
        pair = getattr(a, name)
        _check(len(pair) == 2, f"{where}.{name} must have 2 values (low, high), got {list(pair)!r}")
        for v in pair:
            _number(f"{where}.{name} values", v, low, high, low_open=True)
        _check(pair[0] <= pair[1], f"{where}.{name} must be (low, high) with low <= high, got {list(pair)!r}")
    for name in ("mean", "std"):
        values = getattr(a, name)
        _check(len(values) == 3, f"{where}.{name} must have 3 values (R, G, B), got {list(values)!r}")
        for v in values:
            _number(f"{where}.{name} values", v, 0 if name == "std" else None, low_open=True)


def _check_mask_blocks(cfg: TrainConfig) -> None:
    """SimMIM's blocks tile the image, hold whole patches and leave some visible (two disjoint sets for LUT)."""
    from lut_fast.masking import num_masked_blocks

    m = cfg.model
    side = m.resolved_mask_patch_size()
    _check(
        side % m.patch_size == 0 and m.img_size % side == 0,
        f"model.mask_patch_size {side} must be a multiple of the patch size {m.patch_size} and divide the image size "
        f"{m.img_size} (e.g. {2 * m.patch_size})",
    )
    blocks = (m.img_size // side) ** 2
    visible = blocks - num_masked_blocks(blocks, m.mask_ratio)
    _check(visible >= 1, f"mask ratio {m.mask_ratio} masks all {blocks} blocks of {side} px")
    if cfg.method == "lut_simmim" and cfg.lut.direction == "symmetric":
        _check(2 * visible <= blocks,
               f"LUT needs two disjoint visible sets: mask ratio {m.mask_ratio} must be >= 0.5 ({visible} of {blocks} blocks visible)")


def validate(cfg: TrainConfig) -> None:
    """Every field's type (checked by ``from_dict``), length and range, before anything runs: one line per mistake."""
    from lut_fast.models.vit import PRESETS

    m, o, d, r, lut = cfg.model, cfg.optim, cfg.data, cfg.run, cfg.lut
    _choice("method", cfg.method, METHODS)
    _choice("model", m.name, tuple(PRESETS))
    check = _check
    check(
        cfg.method not in ("lut", "lut_simmim") or cfg.aug.recipe == "lut",
        f"aug.recipe={cfg.aug.recipe} makes one view, LUT needs two: leave aug.recipe to follow the method",
    )
    check(m.img_size > 0 and m.patch_size > 0, "image size and patch size must be positive")
    check(m.img_size % m.patch_size == 0, f"image size {m.img_size} is not divisible by patch size {m.patch_size}")
    for name in ("depth", "embed_dim", "num_heads"):
        _number(f"model.{name}", getattr(m, name), 1, optional=True)
    for name in ("decoder_embed_dim", "decoder_num_heads", "head_hidden_dim"):
        _number(f"model.{name}", getattr(m, name), 1)
    _number("model.decoder_depth", m.decoder_depth, 0)
    check(isinstance(m.mask_ratio, float) and 0.0 < m.mask_ratio < 1.0, f"mask ratio must be in (0, 1), got {m.mask_ratio}")
    num_patches = (m.img_size // m.patch_size) ** 2
    keep = int(num_patches * (1 - m.mask_ratio))
    check(keep >= 1, f"mask ratio {m.mask_ratio} leaves no visible patch out of {num_patches}")
    if cfg.method == "lut":
        check(2 * keep <= num_patches, f"LUT needs two disjoint visible sets: mask ratio {m.mask_ratio} must be >= 0.5")
    _number("model.mask_patch_size", m.mask_patch_size, 1, optional=True)
    if cfg.method in SIMMIM_METHODS and m.img_size % m.patch_size == 0:
        _check_mask_blocks(cfg)
    for name in ("knn_every", "knn_bank", "knn_val"):
        _number(f"run.{name}", getattr(cfg.run, name), 0)
    _choice("data.torch_workers", cfg.data.torch_workers, ("auto", "threads", "processes"))
    embed = m.embed_dim or PRESETS[m.name]["embed_dim"]
    heads = m.num_heads or PRESETS[m.name]["num_heads"]
    check(embed % heads == 0, f"embed dim {embed} is not divisible by {heads} heads")
    check(m.decoder_embed_dim % m.decoder_num_heads == 0, "decoder embed dim must be divisible by decoder heads")

    _number("lut.lam", lut.lam, 0, optional=True)
    _choice("LUT direction", lut.direction, DIRECTIONS)
    _number("lut.ema_momentum", lut.ema_momentum, 0, 1)
    _number("lut.ema_momentum_end", lut.ema_momentum_end, 0, 1)

    check(o.batch_size > 0, f"batch size must be positive, got {o.batch_size}")
    check(o.accum_steps >= 1, f"accumulation steps must be >= 1, got {o.accum_steps}")
    _number("optim.blr (base learning rate)", o.blr, 0, low_open=True)
    _number("optim.lr (learning rate)", o.lr, 0, low_open=True, optional=True)
    _choice("lr scaling", o.lr_scaling, LR_RULES)
    _number("optim.weight_decay", o.weight_decay, 0)
    check(len(o.betas) == 2, f"optim.betas must have 2 values, got {list(o.betas)!r}")
    for b in o.betas:
        _number("optim.betas values", b, 0, 1, high_open=True)
    check(math.isfinite(o.epochs) and o.epochs > 0, f"epochs must be positive, got {o.epochs}")
    _number("optim.warmup_epochs", o.warmup_epochs, 0)
    check(0 <= o.warmup_epochs <= o.epochs, "warmup epochs must be between 0 and epochs")
    check(o.max_steps is None or o.max_steps > 0, f"max steps must be positive, got {o.max_steps}")
    _number("optim.min_lr", o.min_lr, 0)
    _number("optim.clip_grad", o.clip_grad, 0, low_open=True, optional=True)

    _choice("backend", d.backend, BACKENDS)
    check(d.num_workers >= 0, "num_workers must be >= 0")
    _choice("data.photometric_on", d.photometric_on, PHOTOMETRIC_PLACES + ("worker",))  # worker: old name of loader
    _number("data.max_bad_images", d.max_bad_images, 0)
    _choice("data.ffcv_order", d.ffcv_order, FFCV_ORDERS)
    _number("data.dali_shuffle_buffer", d.dali_shuffle_buffer, 1)
    check_aug_support(d.backend, cfg.aug)  # a value the chosen backend would not honour: say so before any work

    _choice("precision", r.precision, PRECISIONS)
    _choice("device", r.device, DEVICES)
    check(r.log_every >= 1 and r.ckpt_every >= 1, "log_every and ckpt_every must be >= 1")
    _number("run.keep_checkpoints (0 = keep all)", r.keep_checkpoints, 0)
    _number("run.seed", r.seed, 0, 2**32 - 1)
    _number("run.max_hours", r.max_hours, 0, low_open=True, optional=True)
    check(r.out_dir is None or str(r.out_dir).strip() != "", "run.out_dir may not be empty")
    validate_aug(cfg.aug)


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
                value = "min(8, cores); with CUDA: cores per GPU - 1"
            rows.append(f"| `{prefix}{f.name}` | `{value}` | {comments.get(f.name, '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(defaults_table())
