"""Watching a run: the online k-NN monitor and the metric sinks (TensorBoard, W&B).

``KnnMonitor``: every ``run.knn_every`` optimizer steps (and at the last
step) the online encoder is put in eval mode and scored by k-NN top-1 on a
labelled val split, with the same vote rule as ``lut-fast eval knn``
(``evaluation/knn.py``). Both sides are bounded: at most ``run.knn_bank``
train images form the feature bank and at most ``run.knn_val`` val images are
scored (seeded samples). The images are decoded once, at the start, and
kept in memory as uint8 (N x 3 x S x S bytes), so each check is forward
passes only. The check must not touch the training stream: it runs under
``no_grad`` on the unwrapped encoder, uses no global random state (and
saves/restores it anyway, CUDA included), and puts the encoder back into
the mode it found it in. Under DDP it runs on rank 0 only; the other ranks
wait at a barrier, so keep the bank small enough for a check to stay well
inside the process-group timeout.

``MetricSinks``: each logged metric record also goes to TensorBoard event
files in ``<run>/tensorboard`` (``run.tensorboard``: unset writes them when
the ``tensorboard`` package is installed, ``true`` requires it, ``false``
turns them off)
and, with ``run.wandb`` (``--wandb``), to Weights & Biases
(``WANDB_MODE=offline`` works without a network). A resumed run purges the
TensorBoard points past its checkpoint (as ``metrics.jsonl`` drops them) and
continues the same W&B run (its id is kept in ``<run>/wandb_id.txt``).
"""

from __future__ import annotations

import contextlib
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lut_fast.errors import UserError

KNN_POOL = "cls"  # the default of ``lut-fast eval knn``, so the last online value matches it
KNN_CROP_PCT = 0.875
KNN_BATCH = 128


# ---------------------------------------------------------------- k-NN monitor


def knn_data_root(knn_data: Optional[str], train_data: Optional[str]) -> Optional[str]:
    """The labelled split root the monitor reads (None = the built-in dataset)."""
    if knn_data is not None:
        return knn_data
    if train_data is None:
        return None
    root = Path(train_data).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        return str(root)
    raise UserError(
        f"run.knn_every needs labelled train/ and val/ image folders, and {train_data} has none: "
        "set run.knn_data to a split root (ROOT/train/<class>/..., ROOT/val/<class>/...)"
    )


def knn_due(every: int, step: int, total_steps: int) -> bool:
    """Whether the k-NN check runs after optimizer step ``step`` (every ``every`` steps and at the last)."""
    return bool(every) and (step % every == 0 or step == total_steps)


def bounded_sample(samples: list, limit: int, seed: int) -> list:
    """At most ``limit`` of ``samples`` (0 = all): a seeded sample, kept in the original order."""
    if limit <= 0 or len(samples) <= limit:
        return list(samples)
    keep = np.random.default_rng(seed).choice(len(samples), size=limit, replace=False)  # a local generator
    return [samples[i] for i in sorted(keep)]


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Leave Python's, NumPy's and torch's (CPU and this CUDA device's) random state as found."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


class KnnMonitor:
    """k-NN top-1 of the online encoder on a bounded val split (see the module docstring)."""

    def __init__(
        self, every: int, data: Optional[str], img_size: int, device: torch.device, bank: int, val: int,
        seed: int = 0, threads: int = 4, k: int = 20, temperature: float = 0.07,
    ):
        from lut_fast.evaluation.common import resolve_splits

        self.every, self.device, self.k, self.temperature = every, device, k, temperature
        splits = resolve_splits(data)
        if not splits.explicit:
            raise UserError(f"the k-NN monitor needs train/ and val/ folders under {data}")
        self.source = splits.source
        self.num_classes = len(splits.classes)
        bank_samples = bounded_sample(splits.train, bank, seed)
        val_samples = bounded_sample(splits.val, val, seed + 1)
        with preserved_rng(device):
            self.bank_images, self.bank_labels = _decode(bank_samples, img_size, threads)
            self.val_images, self.val_labels = _decode(val_samples, img_size, threads)

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> Optional["KnnMonitor"]:
        r = cfg.run
        if not r.knn_every:
            return None
        data = knn_data_root(r.knn_data, cfg.data.path)
        return cls(r.knn_every, data, cfg.model.img_size, device, r.knn_bank, r.knn_val, seed=r.seed,
                   threads=max(1, cfg.data.num_workers))

    @torch.no_grad()
    def features(self, encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        from lut_fast.evaluation.common import normalize, pool_tokens
        from lut_fast.runtime import inference_autocast as autocast

        out = []
        for start in range(0, images.shape[0], KNN_BATCH):
            with autocast(self.device):
                tokens = encoder(normalize(images[start : start + KNN_BATCH], self.device))
            out.append(pool_tokens(tokens, KNN_POOL).float().cpu())
        return torch.cat(out)

    def evaluate(self, encoder: torch.nn.Module) -> dict:
        """``{"knn_top1": ..., "knn_top5": ... (10+ classes), "knn_seconds": ...}`` for the encoder as it is now."""
        from lut_fast.evaluation.common import topk_accuracy
        from lut_fast.evaluation.knn import knn_scores

        t0 = time.perf_counter()
        was_training = encoder.training
        try:
            with preserved_rng(self.device):
                encoder.eval()
                bank = self.features(encoder, self.bank_images)
                query = self.features(encoder, self.val_images)
        finally:
            encoder.train(was_training)
        scores = knn_scores(bank, self.bank_labels, query, self.num_classes, self.k, self.temperature)
        acc = topk_accuracy(scores, self.val_labels)
        out = {f"knn_{name}": value for name, value in acc.items()}
        out["knn_seconds"] = round(time.perf_counter() - t0, 3)
        return out


def _decode(samples: list, img_size: int, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval transform of every sample, once, as one uint8 tensor (PIL releases the GIL: threads suffice)."""
    from lut_fast.evaluation.common import EvalImages

    images = EvalImages(samples, img_size, KNN_CROP_PCT)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        items = list(pool.map(images.__getitem__, range(len(images))))
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


# ---------------------------------------------------------------- metric sinks


def tensorboard_tag(key: str) -> Optional[str]:
    """TensorBoard tag of a metrics.jsonl field (None = not a curve)."""
    if key in ("step", "time"):
        return None
    if key.endswith("loss"):
        return f"loss/{key}"
    if key in ("lr", "momentum"):
        return f"schedule/{key}"
    if key in ("images_per_sec", "data_wait_frac"):
        return f"speed/{key}"
    if key.startswith("knn_"):
        return f"knn/{key[4:]}"
    return f"train/{key}"


def missing_extra(package: str, extra: str, what: str) -> UserError:
    return UserError(f"{what} needs the '{package}' package: pip install 'lut-fast[{extra}]'")


def open_tensorboard(log_dir: Path, wanted: Optional[bool], purge_step: Optional[int]):
    """A ``SummaryWriter`` (torch's, which needs the tensorboard package), or None.

    ``wanted``: None = if the package is installed, True = required, False = off.
    """
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if wanted:
            raise missing_extra("tensorboard", "tensorboard", "run.tensorboard=true") from None
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def open_wandb(out_dir: Path, project: str, config: dict, resuming: bool):
    """A W&B run that continues the folder's previous one on resume (id kept in ``wandb_id.txt``)."""
    try:
        import wandb
    except ImportError:
        raise missing_extra("wandb", "wandb", "--wandb") from None
    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if (resuming and id_file.exists()) else wandb.util.generate_id()
    run = wandb.init(project=project, name=out_dir.name, id=run_id, resume="allow", config=config, dir=str(out_dir))
    id_file.write_text(run_id + "\n")
    return run


def check_settings(cfg) -> None:
    """Fail before any work, on every rank alike: a sink asked for but not installed, k-NN data without val/."""
    import importlib.util

    if cfg.run.knn_every:
        knn_data_root(cfg.run.knn_data, cfg.data.path)

    if cfg.run.wandb and importlib.util.find_spec("wandb") is None:
        raise missing_extra("wandb", "wandb", "--wandb")
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise missing_extra("tensorboard", "tensorboard", "run.tensorboard=true")


class MetricSinks:
    """Where each metric record goes besides metrics.jsonl: TensorBoard and W&B (main process only)."""

    def __init__(self, tensorboard=None, wandb_run=None):
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    @classmethod
    def from_config(cls, cfg, out_dir: Path, start_step: int, enabled: bool) -> "MetricSinks":
        if not enabled:
            return cls()
        from lut_fast.config import to_dict

        # Points past the checkpoint are purged (the resumed run writes them again).
        tb = open_tensorboard(out_dir / "tensorboard", cfg.run.tensorboard, start_step + 1 if start_step else None)
        wb = open_wandb(out_dir, cfg.run.wandb_project, to_dict(cfg), start_step > 0) if cfg.run.wandb else None
        return cls(tb, wb)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        scalars = {tag: float(v) for k, v in record.items()
                   if (tag := tensorboard_tag(k)) is not None and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            # W&B drops a step at or below the last one it holds: after a resume the points it already
            # has are kept (an exact resume reproduces them) and logging continues past them.
            self.wandb_run.log(scalars, step=step)

    def __enter__(self) -> "MetricSinks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
