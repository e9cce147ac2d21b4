"""Frozen-encoder k-NN classification (the DINO protocol).

Features are L2-normalised; for each val image the k most cosine-similar
train images vote for their class with weight exp(similarity / T)
(T = 0.07, k = 20 by default); the class with the largest summed weight wins.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lut_fast.errors import UserError
from lut_fast.evaluation.config import KnnConfig, with_overrides
from lut_fast.evaluation.common import frozen_features, progress, topk_accuracy, write_json


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = KnnConfig.k,
    temperature: float = KnnConfig.temperature,
    chunk: int = 1024,
) -> torch.Tensor:
    """Temperature-weighted votes (N_query, num_classes) of the ``k`` nearest train features (cosine)."""
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise UserError(f"temperature must be positive, got {temperature}")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    out = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def run_knn(ckpt: str | Path, cfg: KnnConfig | None = None, out: Path | None = None, show_progress: bool = True,
            **overrides) -> dict:
    """k-NN accuracy of a checkpoint's frozen encoder; writes ``knn.json`` into ``out`` when given.

    ``cfg``: the settings (default ``KnnConfig()``); keyword ``overrides`` replace single fields of it.
    """
    cfg = with_overrides(KnnConfig, cfg, overrides)
    t0 = time.perf_counter()
    with progress(show_progress) as bar:
        f = frozen_features(ckpt, cfg, out, cfg.batch_size, bar, "k-NN")
    scores = knn_scores(f.train_x, f.train_y, f.val_x, len(f.splits.classes), cfg.k, cfg.temperature)
    result = {
        "command": "knn",
        **topk_accuracy(scores, f.val_y),
        "k": cfg.k,
        "temperature": cfg.temperature,
        "pool": cfg.pool,
        "crop_pct": cfg.crop_pct,
        "features_from_cache": f.from_cache,
        "encoder": f.encoder,
        "data": f.splits.describe(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        write_json(result, Path(out) / "knn.json")
    return result
