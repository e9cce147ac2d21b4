"""Linear probing, MAE protocol: frozen encoder, BatchNorm (no affine) + Linear head.

The encoder is frozen, so its features are computed once (center crop, no
augmentation), cached on disk, and every epoch trains the head on the cached
tensors: epochs after the first cost nothing but the head's matmuls.

Head: ``BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, C)``, weight
trunc-normal std 0.01, bias 0 (MAE's ``main_linprobe.py``). Optimiser: LARS
(MAE; lr = blr * batch / 256, blr 0.1, no weight decay) or SGD with momentum
0.9; linear warm-up then half-cycle cosine, set per step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from lut_fast.evaluation.config import LinearConfig, with_overrides
from lut_fast.evaluation.common import frozen_features, progress, topk_accuracy, tracked, write_json


class LARS(torch.optim.Optimizer):
    """LARS as in MoCo v3 / MAE: trust-ratio scaling and weight decay on >1-D parameters only."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0.0, torch.where(u_norm > 0, g["trust_coefficient"] * p_norm / u_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    cfg: LinearConfig | None = None,
    device: torch.device | str = "cpu",
    bar=None,
    **overrides,
) -> tuple[nn.Module, list[dict]]:
    """Train the head on cached features (``cfg``'s head settings); returns the head and per-epoch val metrics."""
    cfg = with_overrides(LinearConfig, cfg, overrides)
    epochs, batch_size, optimizer, seed = cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.seed
    blr, weight_decay, warmup_epochs = cfg.blr, cfg.weight_decay, cfg.warmup_epochs
    device = torch.device(device)
    batch_size = min(batch_size, train_x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = linear_head(train_x.shape[1], num_classes).to(device)
    lr = blr * batch_size / 256
    params = head.parameters()
    opt = LARS(params, lr=lr, weight_decay=weight_decay) if optimizer == "lars" else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = train_x.shape[0] // batch_size  # drop_last, as MAE
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    xtr, ytr, xva, yva = train_x.to(device), train_y.to(device), val_x.to(device), val_y.to(device)
    loss_fn = nn.CrossEntropyLoss()
    history, step = [], 0
    for epoch in tracked(bar, range(epochs), "linear probe", total=epochs):
        head.train()
        perm = torch.randperm(xtr.shape[0], generator=gen).to(device)
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, warmup, lr)
            loss = loss_fn(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        head.eval()
        with torch.no_grad():
            metrics = topk_accuracy(head(xva).float().cpu(), yva.cpu())
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), **metrics})
    return head.cpu(), history


def run_linear(ckpt: str | Path, cfg: LinearConfig | None = None, out: Path | None = None, show_progress: bool = True,
               **overrides) -> dict:
    """Linear-probe accuracy; writes ``linear.json`` and ``linear_head.pt`` into ``out`` when given.

    ``cfg``: the settings (default ``LinearConfig()``); keyword ``overrides`` replace single fields of it.
    """
    from lut_fast.checkpoint import atomic_torch_save

    cfg = with_overrides(LinearConfig, cfg, overrides)
    t0 = time.perf_counter()
    with progress(show_progress) as bar:
        t_feat = time.perf_counter()
        f = frozen_features(ckpt, cfg, out, cfg.feature_batch_size, bar, "probe")
        t_feat = time.perf_counter() - t_feat
        t_head = time.perf_counter()
        head, history = train_linear_probe(f.train_x, f.train_y, f.val_x, f.val_y, len(f.splits.classes), cfg, f.device, bar)
        t_head = time.perf_counter() - t_head
    splits, info = f.splits, f.encoder
    final = {k: v for k, v in history[-1].items() if k.startswith("top")}
    result = {
        "command": "linear",
        **final,
        "best_top1": max(h["top1"] for h in history),
        "epochs": cfg.epochs,
        "batch_size": min(cfg.batch_size, len(splits.train)),
        "optimizer": cfg.optimizer,
        "lr": cfg.blr * min(cfg.batch_size, len(splits.train)) / 256,
        "weight_decay": cfg.weight_decay,
        "pool": cfg.pool,
        "crop_pct": cfg.crop_pct,
        "features_from_cache": f.from_cache,
        "seconds_features": round(t_feat, 2),
        "seconds_head": round(t_head, 2),
        "encoder": info,
        "data": splits.describe(),
        "history": history,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        out = Path(out)
        atomic_torch_save(
            {"head": head.state_dict(), "classes": splits.classes, "pool": cfg.pool, "encoder": info}, out / "linear_head.pt"
        )
        write_json(result, out / "linear.json")
    return result
