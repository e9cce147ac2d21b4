"""Checkpoints: atomic writes, ``last.pt`` always names the newest complete one.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed (atomic on POSIX): a crash mid-write leaves the previous
checkpoint untouched. ``last.pt`` is a symbolic link swapped the same way
(a plain copy where links are not supported).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lut_fast.errors import UserError
from lut_fast import fileio
from lut_fast.fileio import atomic_write, temp_name_pattern

FORMAT = "lut-fast/1"
ENCODER_PREFIX = "encoder."  # the only prefix stripped when exporting to timm
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


_CKPT_TEMP = temp_name_pattern(r"step_\d+\.pt|last\.pt")  # atomic_write's temporary checkpoint files
_LAST_TEMP = re.compile(r"^\.last\.\d+\.tmp$")  # _point_last's temporary link
_TRAINING_KEYS = ("step", "model", "optimizer", "config")


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
        with target.open("rb") as src:  # streamed: a checkpoint can be gigabytes
            atomic_write(last, lambda f: shutil.copyfileobj(src, f, 16 << 20), binary=True)
        return
    os.replace(tmp, last)


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step_*.pt") if (m := _STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temp_files(ckpt_dir: Path) -> list[Path]:
    """Delete temporary checkpoint files that a killed run left behind (each as large as a checkpoint).

    Only names this module creates are touched (``.step_<N>.pt.<random>.tmp``,
    ``.last.pt.<random>.tmp``, ``.last.<pid>.tmp``); called before a run writes
    its first checkpoint, when no other process writes into the folder.
    """
    removed = fileio.remove_stale_temp_files(ckpt_dir, _CKPT_TEMP)
    return sorted(removed + fileio.remove_stale_temp_files(ckpt_dir, _LAST_TEMP))


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
    if p.is_dir():
        raise UserError(f"{p} is a folder, not a checkpoint file")
    try:
        return _torch_load(p)
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing condition
        raise UserError(f"cannot read checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """A lut-fast training checkpoint (model, optimizer, step, config ...), or a ``UserError`` saying what it is not."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or any(k not in ckpt for k in _TRAINING_KEYS):
        what = "a timm / state-dict file" if isinstance(ckpt, dict) and "format" not in ckpt else "not in lut-fast's format"
        raise UserError(f"{path} is not a lut-fast training checkpoint ({what}); training can only resume from "
                        "files that `lut-fast train` wrote")
    return ckpt


def resume_checkpoint(ckpt_dir: Path) -> tuple[dict | None, list[str]]:
    """The newest readable checkpoint in ``ckpt_dir`` (``last.pt``, else the newest step file) and warnings.

    None when the folder holds no checkpoint at all (a fresh start). When
    checkpoint files exist but none can be read, a ``UserError`` names them:
    starting over would overwrite them. Unreadable step files newer than the
    one resumed from are renamed ``<name>.unreadable`` (kept, never
    overwritten by the resumed run's later checkpoints).
    """
    steps = list(reversed(step_checkpoints(ckpt_dir)))
    last = ckpt_dir / "last.pt"
    candidates = ([last] if last.exists() or last.is_symlink() else []) + [p for p in steps if p.resolve() != last.resolve()]
    unreadable: list[tuple[Path, str]] = []
    for p in candidates:
        try:
            ckpt = load_training_checkpoint(p)
        except UserError as e:
            reason = str(e)
            for prefix in (f"cannot read checkpoint {p}: ", f"{p} is "):
                reason = reason[len(prefix):] if reason.startswith(prefix) else reason
            unreadable.append((p, reason.split(";")[0]))
            continue
        warnings = []
        damaged = {q.resolve() if q.is_symlink() else q for q, _ in unreadable}
        newer = [q for q in steps if q in damaged or q.resolve() in damaged]
        newer = [q for q in newer if _step_of(q) > ckpt["step"]]
        for q in newer:
            with contextlib.suppress(FileNotFoundError):  # another rank of the job moved it first
                q.rename(q.with_name(q.name + ".unreadable"))
        if unreadable:
            names = ", ".join(_describe(q) for q, _ in unreadable)
            warnings.append(f"skipped unreadable checkpoint(s) {names}; resuming from {p.name} (step {ckpt['step']})"
                            + (f"; kept as {', '.join(q.name + '.unreadable' for q in newer)}" if newer else ""))
        return ckpt, warnings
    if unreadable:
        first_reason = unreadable[0][1]
        raise UserError(
            f"cannot resume: none of the {len(unreadable)} checkpoint file(s) in {ckpt_dir} can be read "
            f"({', '.join(_describe(q) for q, _ in unreadable)}: {first_reason}); nothing was changed. "
            f"To start afresh, move {ckpt_dir} away or choose another --out"
        )
    return None, []


def _describe(path: Path) -> str:
    return f"{path.name} -> {os.readlink(path)}" if path.is_symlink() else path.name


def _step_of(path: Path) -> int:
    m = _STEP_FILE.search(path.name)
    return int(m.group(1)) if m else -1


def encoder_state(ckpt: dict, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The encoder's weights with timm's key names (``encoder.`` stripped), from any supported checkpoint.

    Accepts lut-fast checkpoints, exported timm state dicts and MAE-style
    checkpoints (``{"model": {...}}`` holding encoder keys without prefix).
    """
    if "format" in ckpt:
        src = ckpt.get("target") if use_ema else ckpt["model"]
        if src is None:
            raise UserError("this checkpoint has no target (momentum) encoder: its method (mae or simmim) has none")
    elif use_ema:
        raise UserError("--use-ema needs a lut-fast checkpoint (it holds the momentum encoder)")
    else:
        src = ckpt.get("model", ckpt) if isinstance(ckpt.get("model", None), dict) else ckpt
    if any(k.startswith(ENCODER_PREFIX) for k in src):
        return {k[len(ENCODER_PREFIX) :]: v for k, v in src.items() if k.startswith(ENCODER_PREFIX)}
    # already timm-style (exported or official MAE): keep encoder keys, drop decoder / heads
    skip = ("decoder", "mask_token", "head", "fc_norm", "projector", "predictor")
    return {k: v for k, v in src.items() if not k.startswith(skip)}


def export_timm_encoder(
    ckpt_path: str | os.PathLike, out: str | os.PathLike, use_ema: bool = False, overwrite: bool = False,
) -> Path:
    """Write the encoder as a timm state dict (see ``export_timm_state``); returns the file."""
    return export_timm_state(ckpt_path, out, use_ema=use_ema, overwrite=overwrite)[0]


def export_timm_state(
    ckpt_path: str | os.PathLike, out: str | os.PathLike, use_ema: bool = False, overwrite: bool = False,
) -> tuple[Path, dict]:
    """Write the encoder as a timm state dict; returns the file and its architecture (``infer_encoder_arch``)."""
    state, arch = encoder_for_export(ckpt_path, out, use_ema=use_ema, overwrite=overwrite)
    atomic_torch_save(state, Path(out))
    return Path(out), arch


def encoder_for_export(
    ckpt_path: str | os.PathLike, out: str | os.PathLike, use_ema: bool = False, overwrite: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder weights (timm key names) and architecture that an export writes to ``out``.

    Refuses (before reading anything large) an output that is a folder, or
    an existing file without ``overwrite``; refuses a checkpoint without ViT
    encoder weights rather than writing a file a toolkit cannot load.
    """
    if not Path(ckpt_path).exists():
        raise UserError(f"checkpoint not found: {ckpt_path}")
    out_path = Path(out)
    if out_path.is_dir():
        raise UserError(f"{out_path} is a folder: give the output file's name (e.g. {out_path / 'encoder.pth'})")
    if out_path.exists() and not overwrite:
        raise UserError(f"{out_path} already exists: pass --overwrite to replace it")
    ckpt = load_file(ckpt_path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{ckpt_path} does not hold a state dict or a checkpoint")
    state = encoder_state(ckpt, use_ema=use_ema)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{ckpt_path} holds no ViT encoder weights (nothing to export)")
    try:
        arch = infer_encoder_arch(state, ckpt.get("config") if "format" in ckpt else None)
    except UserError as e:
        raise UserError(f"{ckpt_path}: cannot export: {e}") from None
    return state, arch


_TIMM_NAMES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
               1024: "vit_large_patch16_224"}


def timm_create_model_call(arch: dict) -> str:
    """The ``timm.create_model(...)`` line that builds the network an exported file loads into (strict=True).

    The named model supplies nothing the arguments do not override, so the
    line holds for any depth, width, image and patch size. ``global_pool="avg",
    fc_norm=False``: the mean of the patch tokens after the final norm, the
    representation LUT trains (and the key names of the file).
    """
    name = _TIMM_NAMES.get(arch["embed_dim"], "vit_base_patch16_224")
    args = [f'"{name}"', "pretrained=False", "num_classes=0", f"img_size={arch['img_size']}",
            f"patch_size={arch['patch_size']}", f"embed_dim={arch['embed_dim']}", f"depth={arch['depth']}",
            f"num_heads={arch['num_heads']}", f"mlp_ratio={arch['mlp_ratio']:g}", 'global_pool="avg"', "fc_norm=False"]
    return f"timm.create_model({', '.join(args)})"


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


def load_encoder(path: str | os.PathLike, use_ema: bool = False, num_heads: int | None = None, random_init: bool = False,
                 random_init_seed: int = 0):
    """A ``ViTEncoder`` (eval mode, on CPU) and a description of it, from any checkpoint eval/analysis accepts.

    lut-fast checkpoints (online encoder, or the momentum one with ``use_ema``),
    ``lut-fast export timm`` files and official-MAE-style ``{"model": {...}}``
    files. ``random_init`` keeps the architecture and discards the weights (a baseline); the random
    weights are a function of ``random_init_seed`` alone, so a baseline is the same network every time
    and several seeds give its spread.
    """
    from lut_fast.models.vit import ViTEncoder

    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not hold a state dict or a checkpoint")
    state = encoder_state(ckpt, use_ema=use_ema)
    config = ckpt.get("config") if "format" in ckpt else None
    arch = infer_encoder_arch(state, config, num_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_init_seed if random_init else 0)
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
        "random_init_seed": random_init_seed if random_init else None,
        "step": ckpt.get("step") if "format" in ckpt else None,
        **arch,
    }
    return encoder.eval(), info


def checkpoint_all_ranks(state, ckpt_dir: Path, keep: int, distributed: bool, is_main: bool) -> Path | None:
    """Rank 0 saves ``state`` (a ``step.TrainState``) while every rank waits; returns the file on rank 0.

    Replicas should be bit-identical (same reduced gradients, same EMA); if one drifted, rank 0's state
    (the one saved) is copied to all, so the run continues from what the checkpoint holds.
    """
    import sys

    from lut_fast.distributed import barrier, broadcast_from_main, replicas_in_sync

    if distributed:
        replicated = state.replicated_tensors()
        if not replicas_in_sync(replicated, state.device):
            if is_main:
                print(f"lut-fast: warning: model replicas differed at step {state.step}; re-synchronised from rank 0",
                      file=sys.stderr)
            broadcast_from_main(replicated, state.device)
    path = save_checkpoint(state.state_dict(), ckpt_dir, state.step, keep) if is_main else None
    barrier()
    return path
