"""ViT encoder: timm blocks (fused SDPA attention), fixed 2-D sin-cos positions.

Its state dict is exactly timm's ``vit_<size>_patch16_224`` with
``num_classes=0`` (keys cls_token, pos_embed, patch_embed.*, blocks.*, norm.*),
so an exported encoder loads into timm with strict=True.

``forward(x, ids_keep)`` encodes only the patches listed in ``ids_keep``
(MAE/LUT students see the visible tokens); ``ids_keep=None`` encodes all
(the LUT target and evaluation). ``forward(x, mask=m, mask_token=t)`` keeps all
patches but replaces the embedding of each masked one by ``t`` before the
positions are added (SimMIM's student; ``t`` lives in the SimMIM model, so this
state dict stays timm's).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding: half the channels encode rows, half columns; cls gets zeros."""
    assert dim % 4 == 0, "sin-cos position embedding needs dim divisible by 4"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([encode(grid_w), encode(grid_h)], axis=1)  # (L, dim); columns first, as MAE
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear, zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.grid_size = img_size // patch_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, self.grid_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)]
        )
        self.norm = LayerNorm(embed_dim)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight.data  # treat the patch projection like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding (masked patches -> ``mask_token``) + positions (+ selection of ``ids_keep``) + cls token.

        ``mask``: (B, L), 1 = replace that patch's embedding by ``mask_token`` (1, 1, D).
        """
        x = self.patch_embed(x)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1).bool(), mask_token, x)
        x = x + self.pos_embed[:, 1:, :]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded tokens after the final LayerNorm, (B, 1 + K, D) with the cls token first."""
        x = self.tokens(x, ids_keep, mask, mask_token)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def pool_patch_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """LUT's pooling: mean of the patch tokens (cls excluded), after the final norm."""
    return tokens[:, 1:, :].mean(dim=1)


def build_encoder(name: str, img_size: int = 224, patch_size: int = 16, **overrides) -> ViTEncoder:
    arch = dict(PRESETS[name])
    arch.update({k: v for k, v in overrides.items() if v is not None})
    return ViTEncoder(img_size=img_size, patch_size=patch_size, **arch)
