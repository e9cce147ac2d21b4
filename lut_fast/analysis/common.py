"""Shared by the analyses: attention weights of a timm block, per-layer walks, checkpoint labels."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from lut_fast.errors import UserError


def attention_weights(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) of a timm ``Block`` for its input ``x`` (B, N, D) -> (B, heads, N, N).

    timm's fused attention never materialises the weights, so they are
    recomputed from the block's own ``norm1`` and ``qkv`` (and q/k norms),
    exactly as its non-fused path does. Nothing is patched.
    """
    attn = block.attn
    x = block.norm1(x)
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def walk_blocks(encoder, images: torch.Tensor, want_attention: Sequence[int] = (), want_tokens: bool = False):
    """Run the encoder block by block on all tokens.

    Returns ``(attentions, tokens)``: ``attentions[i]`` (B, H, N, N) for each
    block index in ``want_attention`` and, if ``want_tokens``, every block's
    output tokens (B, N, D) (the residual stream, before the final norm).
    """
    wanted = {i % len(encoder.blocks) for i in want_attention}
    x = encoder.tokens(images)
    attentions, tokens = {}, []
    for i, blk in enumerate(encoder.blocks):
        if i in wanted:
            attentions[i] = attention_weights(blk, x)
        x = blk(x)
        if want_tokens:
            tokens.append(x)
    return attentions, tokens


def checkpoint_label(path: str | Path, info: dict | None = None) -> str:
    """A short name for plots: the run folder for ``<run>/checkpoints/x.pt``, else the file stem."""
    p = Path(path)
    name = p.parent.parent.name if p.parent.name == "checkpoints" else p.stem
    if info and info.get("use_ema"):
        name += " (target)"
    if info and info.get("random_init"):
        seed = info.get("random_init_seed")
        name += f" (random init{f', seed {seed}' if seed else ''})"
    return name


def labels_for(ckpts: Sequence[str | Path], labels: str | None, infos: Sequence[dict] | None = None) -> list[str]:
    if labels:
        out = [s.strip() for s in labels.split(",")]
        if len(out) != len(ckpts):
            raise UserError(f"--labels has {len(out)} name(s) for {len(ckpts)} checkpoint(s)")
        return out
    names = [checkpoint_label(c, infos[i] if infos else None) for i, c in enumerate(ckpts)]
    if len(set(names)) < len(names):  # same stems (e.g. two last.pt): fall back to the parent folders
        names = [f"{Path(c).parent.name}/{n}" for c, n in zip(ckpts, names)]
    return names


def labelled_encoders(ckpts: Sequence[str | Path], cfg) -> Iterator[tuple[str, str | Path, torch.nn.Module, dict]]:
    """(label, path, encoder, info) for each checkpoint, loaded one at a time as ``cfg`` asks
    (``use_ema``, ``num_heads``; ``labels`` names them, else ``labels_for`` does)."""
    from lut_fast.checkpoint import load_encoder

    names = labels_for(ckpts, cfg.labels, [{"use_ema": cfg.use_ema}] * len(ckpts))
    for name, ckpt in zip(names, ckpts):
        encoder, info = load_encoder(ckpt, use_ema=cfg.use_ema, num_heads=cfg.num_heads)
        yield name, ckpt, encoder, info


def require_checkpoints(ckpts: Sequence[str | Path]) -> None:
    """Fail before any work if a checkpoint path does not exist."""
    if not ckpts:
        raise UserError("give at least one checkpoint")
    for c in ckpts:
        if not Path(c).is_file():
            raise UserError(f"checkpoint not found: {c}")


def analysis_samples(data: str | None, split: str, max_images: int, val_fraction: float, seed: int):
    """(samples, splits): the (path, label) pairs an analysis reads (one split, at most ``max_images``,
    a seeded subset) and the resolved splits they come from."""
    import numpy as np

    from lut_fast.evaluation.common import resolve_splits

    if split not in ("train", "val"):
        raise UserError(f"--split must be train or val, got {split!r}")
    splits = resolve_splits(data, val_fraction, seed)
    samples = splits.val if split == "val" else splits.train
    if max_images > 0 and len(samples) > max_images:
        pick = np.random.default_rng(seed).choice(len(samples), max_images, replace=False)
        samples = [samples[i] for i in sorted(pick)]
    return samples, splits
