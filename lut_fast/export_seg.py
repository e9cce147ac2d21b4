"""Export the encoder for semantic segmentation toolkits (``lut-fast export mmseg``).

Three key layouts, all holding the same weights:

``mmseg-mae`` (default)
    mmsegmentation's ``MAE`` backbone (``mmseg/models/backbones/mae.py``, a
    BEiT-style ViT with absolute positions), the backbone of mmseg's MAE
    ADE20K recipe. Flat state dict; the layer-scale factors ``gamma_1`` /
    ``gamma_2`` are written as ones, so the loaded backbone computes exactly
    our encoder whatever ``init_values`` the config sets.
``mmseg-vit``
    mmsegmentation's plain ``VisionTransformer`` (``vit.py``): the key names
    mmseg's ``vit2mmseg`` converter produces from a timm checkpoint
    (``layers.N.attn.attn.in_proj_weight`` ...). Flat state dict.
``mae``
    The layout of MAE's released pre-training checkpoints, ``{"model": {...}}``
    with timm key names: what loaders written for those files take
    (BEiT/MAE-style fine-tuning code, converters for MAE's weights,
    ``lut-fast train --init-from``).

Positions. Our ViT uses fixed 2-D sin-cos *absolute* position embeddings;
they are written as ``pos_embed`` (class-token entry first), resized to the
target grid (``img_size / patch_size``) by bicubic interpolation on the grid
with the class token's entry kept. That is the resize mmseg applies itself
when it loads a 224-px checkpoint into a 512-px backbone, so an exported
file behaves as MAE's released weights do under the same recipe (and the
loader finds the size it expects and resizes nothing). No relative position
bias tables are written (pre-training has none): mmseg's ``MAE`` backbone
creates one per layer initialised to zero, so fine-tuning starts from
exactly our encoder's function and learns the bias from there; its ``BEiT``
backbone would instead draw random tables and has no absolute ``pos_embed``
to load, so use ``type='MAE'``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lut_fast.checkpoint import atomic_torch_save, encoder_for_export
from lut_fast.errors import UserError

LAYOUTS = ("mmseg-mae", "mmseg-vit", "mae")

# Per-block renames from timm's names (our encoder's) to each mmseg backbone's: module path -> target,
# "{}" standing for the parameter's own name (weight / bias).
_BLOCK_RENAMES = {
    "mmseg-vit": {  # mmcv's MultiheadAttention wraps torch.nn.MultiheadAttention (fused in_proj)
        "norm1": "ln1.{}", "norm2": "ln2.{}",
        "attn.qkv": "attn.attn.in_proj_{}", "attn.proj": "attn.attn.out_proj.{}",
        "mlp.fc1": "ffn.layers.0.0.{}", "mlp.fc2": "ffn.layers.1.{}",
    },
    "mmseg-mae": {
        "norm1": "ln1.{}", "norm2": "ln2.{}",
        "attn.qkv": "attn.qkv.{}", "attn.proj": "attn.proj.{}",
        "mlp.fc1": "ffn.layers.0.0.{}", "mlp.fc2": "ffn.layers.1.{}",
    },
}
# Outside the blocks (both mmseg backbones): the final LayerNorm is ``ln1`` when built with final_norm=True.
_TOP_RENAMES = {"patch_embed.proj": "patch_embed.projection.{}", "norm": "ln1.{}"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_KEY = re.compile(r"^(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class SegExport:
    """What ``export_segmentation`` wrote: the file, its layout, and the backbone it fits."""

    path: Path
    layout: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    source_grid: int  # pos_embed grid in the checkpoint
    grid: int  # pos_embed grid in the file


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): bicubic on the g x g grid (row-major), class token kept.

    Returns an unchanged copy when the grid already has the target size.
    """
    num_patches = pos_embed.shape[1] - 1
    old = math.isqrt(num_patches)
    if old * old != num_patches:
        raise UserError(f"pos_embed has {num_patches} patch positions, not a square grid")
    if old == grid:
        return pos_embed.clone()
    dim = pos_embed.shape[2]
    patches = pos_embed[:, 1:].float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


def _rename(key: str, layout: str) -> str | None:
    if key in ("cls_token", "pos_embed"):
        return key
    block = _BLOCK_KEY.match(key)
    if block:
        index, module, param = block.groups()
        target = _BLOCK_RENAMES[layout].get(module)
        return f"layers.{index}.{target.format(param)}" if target else None
    top = _TOP_KEY.match(key)
    target = _TOP_RENAMES.get(top.group(1)) if top else None
    return target.format(top.group(2)) if target else None


def segmentation_state(state: dict[str, torch.Tensor], layout: str, grid: int) -> dict:
    """Our encoder's weights (timm names) in ``layout``, pos_embed resized to ``grid`` x ``grid``."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    state = {**state, "pos_embed": resize_pos_embed(state["pos_embed"], grid)}
    if layout == "mae":
        return {"model": state}
    out: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in state.items():
        new = _rename(key, layout)
        if new is None:
            unplaced.append(key)
        else:
            out[new] = value
    if unplaced:
        raise UserError(f"the encoder has weights the {layout} layout has no place for "
                        f"({', '.join(unplaced[:4])}{' ...' if len(unplaced) > 4 else ''})")
    if layout == "mmseg-mae":
        # Layer scale: ones make each residual branch count fully, as in our blocks (which have none).
        depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
        dim = state["cls_token"].shape[-1]
        for i in range(depth):
            out[f"layers.{i}.gamma_1"] = torch.ones(dim)
            out[f"layers.{i}.gamma_2"] = torch.ones(dim)
    return out


def export_segmentation(
    ckpt_path: str | os.PathLike, out: str | os.PathLike, layout: str = "mmseg-mae", img_size: int = 512,
    use_ema: bool = False, overwrite: bool = False,
) -> SegExport:
    """Write the encoder of ``ckpt_path`` for a segmentation backbone of ``img_size`` pixels; see the module doc."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if img_size <= 0:
        raise UserError(f"--img-size must be positive, got {img_size}")
    state, arch = encoder_for_export(ckpt_path, out, use_ema=use_ema, overwrite=overwrite)
    patch = arch["patch_size"]
    if img_size % patch:
        raise UserError(f"--img-size {img_size} is not a multiple of the patch size {patch} "
                        f"(e.g. {max(patch, img_size // patch * patch)} or {(img_size // patch + 1) * patch})")
    grid = img_size // patch
    atomic_torch_save(segmentation_state(state, layout, grid), Path(out))
    return SegExport(
        path=Path(out), layout=layout, img_size=img_size, patch_size=patch, embed_dim=arch["embed_dim"],
        depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"],
        source_grid=arch["img_size"] // patch, grid=grid,
    )


def backbone_config(result: SegExport) -> str:
    """The mmseg config lines that build a backbone the exported file loads into (printed by the CLI)."""
    shape = (f"img_size=({result.img_size}, {result.img_size}), patch_size={result.patch_size}, "
             f"embed_dims={result.embed_dim}, num_layers={result.depth}, num_heads={result.num_heads}, "
             f"mlp_ratio={result.mlp_ratio:g}, norm_cfg=dict(type='LN', eps=1e-6)")
    if result.layout == "mae":
        return ("# the layout of MAE's released pre-trained checkpoints: load it with code written for those files;\n"
                "# for mmsegmentation itself, export with --layout mmseg-mae (or mmseg-vit) instead")
    if result.layout == "mmseg-vit":
        # patch_bias: mmseg >= 1.0 builds the patch projection without a bias unless told; ours has one.
        backbone = f"dict(type='VisionTransformer', {shape}, patch_bias=True, with_cls_token=True)"
    else:
        backbone = f"dict(type='MAE', {shape}, init_values=1.0)"
    return f"# in the mmseg config:\nmodel = dict(pretrained='{result.path}', backbone={backbone})"
