"""Continuing, extending and branching runs: which settings may change on resume, and starting from other weights.

Resuming (``--resume``, ``--resume-from PATH``) continues the saved recipe.
Settings given on the resuming command are compared with the checkpoint's:

* may change (each change is printed in the header): everything under
  ``data.`` (a moved dataset, workers, backend options), everything under
  ``run.`` except the seed (device, precision, compile, logging, checkpoint
  cadence, ``--max-hours``), and the run's length, ``optim.max_steps`` /
  ``optim.epochs``;
* refused, with the reason: the method, the model, the LUT loss, the
  augmentations, the batch geometry and the optimizer recipe (they define
  what is being trained; ``--init-from`` starts a new run from the weights
  instead), and ``run.seed`` (data order, augmentations and masks derive
  from it).

Changing the length re-plans the schedules: the lr's half-cycle cosine and
the EMA momentum's cosine run to the new last step, as if the run had been
started with that length; warm-up keeps the steps it had. So at the resume
point the lr moves to the new curve's value (up when extending a run whose
cosine had already decayed); the header prints both values.

``--init-from FILE`` starts a *new* run (step 0, fresh optimizer and
schedule) from other weights: a lut-fast checkpoint (every tensor whose name
and shape fit: encoder, decoder, heads), a ``lut-fast export timm`` file or an
MAE-style ``{"model": {...}}`` file (the encoder). What was loaded and what is
freshly initialised is printed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from lut_fast.config import TrainConfig, from_dict, to_dict, validate
from lut_fast.errors import UserError

# Dotted config keys (or prefixes ending in '.') that a resumed run may change.
MAY_CHANGE_ON_RESUME = ("data.", "run.", "optim.max_steps", "optim.epochs")
_REFUSED_REASONS = (
    ("run.seed", "data order, augmentations and masks derive from the seed, so a resumed run keeps it"),
    ("optim.batch_size", "the effective batch sets the lr and the data order"),
    ("optim.accum_steps", "the effective batch sets the lr and the data order"),
    ("optim.", "the optimizer recipe is part of the run"),
    ("method", "the model and the loss were built for the saved method"),
    ("model.", "the checkpoint's weights have the saved architecture"),
    ("lut.", "the loss and its momentum target are part of the run"),
    ("aug.", "the augmentations are part of the recipe"),
)
_NOT_COMPARED = ("run.out_dir", "aug.recipe", "aug.img_size")  # the folder itself; derived from method and model


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _may_change(key: str) -> bool:
    return key != "run.seed" and any(key == p or (p.endswith(".") and key.startswith(p)) for p in MAY_CHANGE_ON_RESUME)


def _reason(key: str) -> str:
    return next(r for p, r in _REFUSED_REASONS if key == p or (p.endswith(".") and key.startswith(p)))


def settings_on_resume(saved: TrainConfig, given: TrainConfig, given_keys: Optional[Iterable[str]]) -> tuple[TrainConfig, list[str]]:
    """The config a resumed run continues with, and one line per setting changed.

    ``given_keys``: the dotted keys set on this command (YAML file, flags,
    ``--set``); None compares every field (the Python API, where the whole
    config is given). Raises ``UserError`` for a setting that may not change.
    """
    old, new = _flat(to_dict(saved)), _flat(to_dict(given))
    keys = list(new) if given_keys is None else [k for k in new if k in set(given_keys)]
    changes, refused = [], []
    tree = to_dict(saved)
    for key in keys:
        if key in _NOT_COMPARED or old.get(key) == new[key]:
            continue
        if not _may_change(key):
            refused.append(key)
            continue
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = new[key]
        changes.append(f"{key}: {old.get(key)!r} -> {new[key]!r}")
    if refused:
        first = refused[0]
        others = f" (also {', '.join(refused[1:])})" if len(refused) > 1 else ""
        raise UserError(
            f"cannot change {first} on resume ({old.get(first)!r} -> {new[first]!r}){others}: {_reason(first)}; "
            "start a new run (--init-from CKPT starts one from these weights) or drop the setting"
        )
    cfg = from_dict(TrainConfig, tree)
    cfg.run.out_dir = given.run.out_dir
    if "optim.epochs" in {c.split(":")[0] for c in changes} and cfg.optim.max_steps is not None:
        raise UserError(
            f"this run's length is optim.max_steps={cfg.optim.max_steps}, which takes precedence over epochs: "
            "change it with --max-steps N (or --set optim.max_steps=null to follow --epochs)"
        )
    validate(cfg)
    return cfg, changes


def continue_schedule(sched, saved_schedule: dict, start_step: int, lr_of) -> list[str]:
    """Adjust ``sched`` (a ``train.Schedule``, in place) to a checkpoint's; lines describing any change.

    ``lr_of(schedule, step)`` gives the lr of a schedule at a step.
    """
    if saved_schedule["steps_per_epoch"] != sched.steps_per_epoch:
        raise UserError(
            f"the data now gives {sched.steps_per_epoch} steps per epoch, the checkpoint's gave "
            f"{saved_schedule['steps_per_epoch']}: a resumed run must read the same dataset (a moved copy is fine)"
        )
    sched.warmup_steps = saved_schedule["warmup_steps"]  # warm-up keeps the steps it had
    old_total = saved_schedule["total_steps"]
    if sched.total_steps == old_total:
        return []
    if sched.total_steps < start_step:
        raise UserError(
            f"the checkpoint is at step {start_step}; a schedule of {sched.total_steps} steps would end before it"
        )
    old = dataclasses.replace(sched, total_steps=old_total)
    verb = "extended" if sched.total_steps > old_total else "shortened"
    return [
        f"schedule {verb} from {old_total} to {sched.total_steps} steps: lr and momentum cosines re-planned to end at "
        f"step {sched.total_steps} (warm-up stays {sched.warmup_steps}); lr at step {start_step}: "
        f"{lr_of(old, start_step):.3g} -> {lr_of(sched, start_step):.3g}"
    ]


def load_resume_file(path: Path) -> dict:
    """A checkpoint chosen with ``--resume-from``: it must be a lut-fast training checkpoint."""
    from lut_fast.checkpoint import load_training_checkpoint

    try:
        return load_training_checkpoint(path)
    except UserError as e:
        raise UserError(f"{e} (use --init-from to start a new run from its weights)") from None


def check_branch(resume_from: Path, ckpt_dir: Path, step: int) -> Optional[Path]:
    """Where a ``--resume-from`` checkpoint may continue; the source run's metrics.jsonl when branching.

    Same folder: refused if it holds checkpoints after the chosen one (two
    histories would mix). Another folder: must not hold a run yet.
    """
    from lut_fast.checkpoint import step_checkpoints

    source_dir = resume_from.resolve().parent
    if ckpt_dir.exists() and source_dir == ckpt_dir.resolve():
        later = [p.name for p in step_checkpoints(ckpt_dir) if _step_of(p) > step]
        if later:
            raise UserError(
                f"{ckpt_dir} holds checkpoints after step {step} ({', '.join(later)}): continuing from step {step} here "
                "would mix two histories; pass --out NEW to branch into a new folder"
            )
        return None
    if (ckpt_dir / "last.pt").exists():
        raise UserError(f"{ckpt_dir.parent} already holds a run: choose another --out to continue from {resume_from}")
    metrics = source_dir.parent / "metrics.jsonl"
    return metrics if source_dir.name == "checkpoints" and metrics.exists() else None


def _step_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


def copy_metrics_until(source: Path, dest: Path, step: int) -> None:
    """The branched run's metrics.jsonl starts with the source run's lines up to its checkpoint."""
    kept = []
    for line in source.read_text().splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a torn last line of the source is not copied
            continue
    dest.write_text("".join(ln + "\n" for ln in kept))


def _group(key: str) -> str:
    top = key.split(".")[0]
    return top if top in ("encoder", "projector", "predictor") else "decoder"


def init_weights_from(model: torch.nn.Module, path: str) -> str:
    """Load the weights of ``path`` that fit ``model`` (a new run's student); a line saying what was loaded."""
    from lut_fast.checkpoint import ENCODER_PREFIX, encoder_state, load_file

    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"--init-from {path}: the file holds no state dict or checkpoint")
    if "format" in ckpt:
        src = ckpt["model"]
        kind = f"lut-fast checkpoint (step {ckpt.get('step')}, {ckpt.get('config', {}).get('method', '?')})"
    else:
        src = {ENCODER_PREFIX + k: v for k, v in encoder_state(ckpt).items()}
        kind = "encoder weights"
    own = model.state_dict()
    fits = {k: v for k, v in src.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    misfit = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in src.items() if k in own and k not in fits]
    if misfit:
        raise UserError(
            f"--init-from {path}: weights do not fit this model ({'; '.join(misfit[:3])}{' ...' if len(misfit) > 3 else ''}): "
            "choose the same --model, --img-size, --patch-size and depth"
        )
    encoder_missing = [k for k in own if k.startswith(ENCODER_PREFIX) and k not in fits and not k.endswith("pos_embed")]
    if encoder_missing:
        raise UserError(
            f"--init-from {path}: the file's encoder does not fit this model (no {encoder_missing[0]}): "
            "choose the same --model, --img-size, --patch-size and depth"
        )
    model.load_state_dict(fits, strict=False)
    loaded = sorted({_group(k) for k in fits})
    fresh = sorted({_group(k) for k in own} - set(loaded))
    ignored = sorted({_group(k) for k in src if k not in own} - set(loaded))
    return (
        f"initialised from {path} ({kind}): loaded {', '.join(loaded)}"
        + (f"; fresh: {', '.join(fresh)}" if fresh else "")
        + (f"; not used: {', '.join(ignored)}" if ignored else "")
        + "; optimizer and schedule start at step 0"
    )


# ---------------------------------------------------------------- resume or start


@dataclasses.dataclass
class Start:
    """Where a run starts: the recipe it trains, and the checkpoint it continues (None: a new run)."""

    cfg: TrainConfig
    checkpoint: Optional[dict]
    changes: list[str]  # settings changed on resume (printed in the header)
    warnings: list[str]  # skipped unreadable checkpoints
    branch_metrics: Optional[Path]  # --resume-from in another run: its metrics.jsonl, copied up to the step


def resolve_start(cfg: TrainConfig, resume: bool, resume_from, ckpt_dir: Path, device, world_size: int,
                  given_keys: Optional[Iterable[str]]) -> Start:
    """Resume or start, agreed by every rank: the checkpoint to continue and the recipe that wins.

    Every rank reads the checkpoint itself; all must see the same one, and all must stop together
    (one rank raising alone would leave the others waiting in a collective).
    """
    from lut_fast.checkpoint import resume_checkpoint
    from lut_fast.distributed import all_same, restart_count

    if not resume and restart_count() > 0:
        resume = True  # torchrun --max-restarts restarted the group after a failure: continue the run
    branch_metrics, warnings = None, []
    if resume_from is not None and not (restart_count() > 0 and (ckpt_dir / "last.pt").exists()):
        checkpoint = load_resume_file(Path(resume_from))
        branch_metrics = check_branch(Path(resume_from), ckpt_dir, checkpoint["step"])
        resume = True
    else:  # a restarted group continues from its own newest checkpoint, also when it began with --resume-from
        checkpoint, warnings = resume_checkpoint(ckpt_dir) if resume else (None, [])
    found_step = checkpoint["step"] if checkpoint is not None else -1
    occupied = int(not resume and (ckpt_dir / "last.pt").exists())
    if not (all_same(found_step, device) and all_same(occupied, device)):
        raise UserError(
            f"the processes see different checkpoints in {ckpt_dir}: "
            "the output folder must be on a filesystem that every node shares"
        )
    changes: list[str] = []
    if checkpoint is not None:
        # The saved recipe wins; settings given now may change only where this module allows (else: refused).
        cfg, changes = settings_on_resume(from_dict(TrainConfig, checkpoint["config"]), cfg, given_keys)
        o = cfg.optim
        saved_world = checkpoint.get("world_size") or checkpoint["schedule"]["eff_batch"] // (o.batch_size * o.accum_steps)
        if saved_world != world_size:
            raise UserError(
                f"the checkpoint in {ckpt_dir} was trained by {saved_world} process(es), this run has "
                f"{world_size}: the effective batch, lr and data order would change; "
                f"resume with {saved_world} processes"
            )
    elif occupied:
        raise UserError(f"{cfg.out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    return Start(cfg, checkpoint, changes, warnings, branch_metrics)
