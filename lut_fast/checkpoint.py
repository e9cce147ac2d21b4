"""Checkpoints: atomic writes, ``last.pt`` always names the newest complete one.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed (atomic on POSIX): a crash mid-write leaves the previous
checkpoint untouched. ``last.pt`` is a symbolic link swapped the same way
(a plain copy where links are not supported).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lut_fast.errors import UserError
from lut_fast.fileio import atomic_write

FORMAT = "lut-fast/1"
ENCODER_PREFIX = "encoder."  # the only prefix stripped when exporting to timm
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _point_last(ckpt_dir: Path, target: Path) -> None:
    last = ckpt_dir / "last.pt"
    tmp = ckpt_dir / f".last.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target.name, tmp)
    except OSError:  # no symlinks here: copy (still atomic through the rename)
        shutil.copyfile(target, tmp)
    os.replace(tmp, last)


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step_*.pt") if (m := _STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep: int = 2) -> Path:
    """Write ``step_<N>.pt``, point ``last.pt`` at it, keep the newest ``keep`` step files."""
    path = ckpt_dir / f"step_{step:08d}.pt"
    atomic_torch_save({"format": FORMAT, **state}, path)
    _point_last(ckpt_dir, path)
    for old in step_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _torch_load(path: Path) -> dict:
    """Memory-mapped where the file allows it (each rank of a resuming job would otherwise hold a full copy);
    plain loading for legacy (pre-zip) files, which cannot be mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=False)


def load_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    try:
        return _torch_load(p)
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing condition
        raise UserError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from None


def latest_checkpoint(ckpt_dir: Path) -> dict | None:
    """The newest readable checkpoint: ``last.pt``, else the newest step file that loads."""
    candidates = [ckpt_dir / "last.pt"] + list(reversed(step_checkpoints(ckpt_dir)))
    for p in candidates:
        if p.exists():
            try:
                return _torch_load(p)
            except Exception:  # noqa: BLE001 - fall back to an older complete file
                continue
    return None


def encoder_state(ckpt: dict, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The encoder's weights with timm's key names (``encoder.`` stripped), from any supported checkpoint.

    Accepts lut-fast checkpoints, exported timm state dicts and MAE-style
    checkpoints (``{"model": {...}}`` holding encoder keys without prefix).
    """
    if "format" in ckpt:
        src = ckpt.get("target") if use_ema else ckpt["model"]
        if src is None:
            raise UserError("this checkpoint has no target (momentum) encoder: it was trained with --method mae")
    elif use_ema:
        raise UserError("--use-ema needs a lut-fast checkpoint (it holds the momentum encoder)")
    else:
        src = ckpt.get("model", ckpt) if isinstance(ckpt.get("model", None), dict) else ckpt
    if any(k.startswith(ENCODER_PREFIX) for k in src):
        return {k[len(ENCODER_PREFIX) :]: v for k, v in src.items() if k.startswith(ENCODER_PREFIX)}
    # already timm-style (exported or official MAE): keep encoder keys, drop decoder / heads
    skip = ("decoder", "mask_token", "head", "fc_norm", "projector", "predictor")
    return {k: v for k, v in src.items() if not k.startswith(skip)}


def export_timm_encoder(ckpt_path: str | os.PathLike, out: str | os.PathLike, use_ema: bool = False) -> Path:
    state = encoder_state(load_file(ckpt_path), use_ema=use_ema)
    out_path = Path(out)
    atomic_torch_save(state, out_path)
    return out_path


# ---------------------------------------------------------------- encoders for evaluation and analysis

_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # timm's ViT-Ti/S/B/L/H


def infer_encoder_arch(state: dict[str, torch.Tensor], config: dict | None = None, num_heads: int | None = None) -> dict:
    """ViTEncoder keyword arguments (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio) of an encoder state dict.

    Everything but the number of heads is read off the tensor shapes. Heads
    come from ``num_heads`` if given, else the lut-fast config stored in the
    checkpoint, else timm's ViT-Ti/S/B/L/H width -> heads table, else width / 64.
    """
    required = ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"not a ViT encoder state dict (missing {', '.join(missing)})")
    embed_dim, _, patch, patch_w = state["patch_embed.proj.weight"].shape
    num_tokens = state["pos_embed"].shape[1] - (1 if "cls_token" in state else 0)
    grid = round(num_tokens**0.5)
    if grid * grid != num_tokens or patch != patch_w:
        raise UserError(f"only square inputs and patches are supported (pos_embed has {num_tokens} patch tokens)")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    if num_heads is None and config:
        model_cfg = config.get("model", {})
        num_heads = model_cfg.get("num_heads")
        if num_heads is None and model_cfg.get("name"):
            from lut_fast.models.vit import PRESETS

            num_heads = PRESETS.get(model_cfg["name"], {}).get("num_heads")
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64))
    if embed_dim % num_heads:
        raise UserError(f"embed dim {embed_dim} is not divisible by {num_heads} heads (pass --num-heads)")
    return dict(
        img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio,
    )


def load_encoder(path: str | os.PathLike, use_ema: bool = False, num_heads: int | None = None, random_init: bool = False):
    """A ``ViTEncoder`` (eval mode, on CPU) and a description of it, from any checkpoint eval/analysis accepts.

    lut-fast checkpoints (online encoder, or the momentum one with ``use_ema``),
    ``lut-fast export timm`` files and official-MAE-style ``{"model": {...}}``
    files. ``random_init`` keeps the architecture and discards the weights (a baseline).
    """
    from lut_fast.models.vit import ViTEncoder

    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not hold a state dict or a checkpoint")
    state = encoder_state(ckpt, use_ema=use_ema)
    config = ckpt.get("config") if "format" in ckpt else None
    arch = infer_encoder_arch(state, config, num_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random-init baseline is the same network every time
        encoder = ViTEncoder(**arch)
    if not random_init:
        # Sin-cos positions are fixed; a file without them (or with learned ones) keeps/loads as given.
        result = encoder.load_state_dict(state, strict=False)
        bad = [k for k in result.missing_keys if k != "pos_embed"] + list(result.unexpected_keys)
        if bad:
            raise UserError(f"{path}: encoder weights do not match a ViT ({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})")
    info = {
        "checkpoint": str(path),
        "kind": "lut-fast" if "format" in ckpt else ("mae-style" if isinstance(ckpt.get("model"), dict) else "timm"),
        "method": (config or {}).get("method"),
        "use_ema": use_ema,
        "random_init": random_init,
        "step": ckpt.get("step") if "format" in ckpt else None,
        **arch,
    }
    return encoder.eval(), info
