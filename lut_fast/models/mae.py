"""MAE: ViT encoder on the visible patches, light decoder, pixel loss on masked patches.

Follows the structure of MAE's ``models_mae.py``. The forward signature is
shared with LUT so the train loop serves both methods:
``forward(view1, view2=None, noise=..., targets=None) -> dict of losses``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from lut_fast.losses import mae_pixel_loss
from lut_fast.masking import binary_mask, keep_ids, num_visible, shuffle_from_noise
from lut_fast.models.vit import LayerNorm, ViTEncoder, init_weights, sincos_pos_embed_2d


class MaskedAutoencoder(nn.Module):
    def __init__(
        self,
        encoder: ViTEncoder,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_size
        num_patches = encoder.num_patches
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_embed_dim, encoder.grid_size), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, 4.0, qkv_bias=True, norm_layer=LayerNorm) for _ in range(decoder_depth)]
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * 3)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        self.num_keep = num_visible(num_patches, mask_ratio)

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, p*p*3), patches in row-major order, pixels (p, p, c)."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        b, num, _ = x.shape
        g = int(num**0.5)
        x = x.reshape(b, g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, g * p, g * p)

    # ------------------------------------------------------------------ decoder
    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Visible latents + mask tokens, unshuffled to patch order -> pixel predictions (B, L, p*p*3)."""
        x = self.decoder_embed(latent)
        b, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, num_patches + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def reconstruction(self, view1: torch.Tensor, latent1: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        pred = self.decode(latent1, ids_restore)
        mask = binary_mask(ids_restore, self.num_keep)
        return mae_pixel_loss(self.patchify(view1), pred, mask, self.norm_pix_loss)

    def forward(self, view1, view2=None, noise=None, targets=None) -> dict[str, torch.Tensor]:
        if noise is None:
            noise = torch.rand(view1.shape[0], self.encoder.num_patches, device=view1.device)
        ids_shuffle, ids_restore = shuffle_from_noise(noise)
        latent = self.encoder(view1, keep_ids(ids_shuffle, self.num_keep, 0))
        loss = self.reconstruction(view1, latent, ids_restore)
        return {"loss": loss, "mae_loss": loss.detach()}
