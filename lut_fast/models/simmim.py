"""SimMIM and LUT on SimMIM: the encoder keeps every patch, masked ones become a learned token.

SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling"), as its
official code builds it for a ViT:

* block-wise masking (``masking.block_mask``): blocks of 32 px, 60 % of them masked;
* the encoder sees all L patches; a masked patch's embedding is replaced by one
  learned ``mask_token`` before the positions are added (no token dropping);
* a linear prediction head maps each encoded patch token to its p*p*3 pixels (SimMIM's
  1x1 convolution + PixelShuffle is this same linear map per token; PyTorch initialises
  a Linear and a 1x1 Conv2d the same way);
* an L1 loss on the masked pixels of the (ImageNet-normalised) input, averaged over the
  masked pixels and the 3 channels, as SimMIM's code does (``simmim_pixel_loss``).

``LUTSimMIM`` adds LUT's broader-context term (docs/METHOD.md, "LUT on SimMIM"): the
student pools its *unmasked* patch tokens (mask tokens left out), maps them through a
projector and a predictor (``models.lut.mlp_head``, one call per view) and is pulled
toward the momentum target (``ema.TargetNetwork``: EMA encoder + projector on the whole
other view) by ``losses.bc_loss``. Block masks of the two views come from one block
shuffle, so their visible blocks are disjoint (the analogue of LUT's ids[:K] / ids[K:2K]).

    symmetric:  bc = (bc(q(view1 masked), t(view2)) + bc(q(view2 masked), t(view1))) / 2
    one_way:    bc = bc(q(view1 masked), t(view2))
    loss = simmim(view1) + lambda * bc          (lambda = 0, or no targets: exactly SimMIM)

The forward signature is MAE's and LUT's: ``forward(view1, view2=None, noise=..., targets=None)``
with ``noise`` one value per mask block (B, blocks**2).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lut_fast.losses import bc_loss
from lut_fast.masking import block_mask, mask_grid, num_masked_blocks
from lut_fast.models.lut import BroaderContext
from lut_fast.models.vit import ViTEncoder


def simmim_pixel_loss(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 on masked pixels: sum |pred - x| over masked pixels and channels / (masked pixels + 1e-5) / C.

    images, pred: (B, C, H, W); mask: (B, 1, H, W), 1 = masked pixel. The 1e-5 is SimMIM's.
    """
    per_pixel = F.l1_loss(pred.float(), images.float(), reduction="none")
    return (per_pixel * mask).sum() / (mask.sum() + 1e-5) / images.shape[1]


def pool_unmasked(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the patch tokens (cls excluded) whose patch is visible; mask (B, L), 1 = masked."""
    keep = (1.0 - mask).unsqueeze(-1).to(tokens.dtype)
    return (tokens[:, 1:, :] * keep).sum(dim=1) / keep.sum(dim=1)


class SimMIM(nn.Module):
    def __init__(self, encoder: ViTEncoder, mask_patch_size: int = 32, mask_ratio: float = 0.6):
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.mask_ratio = mask_ratio
        self.mask_patch_size = mask_patch_size
        img_size = encoder.grid_size * encoder.patch_size
        self.blocks_per_side, self.block_scale = mask_grid(img_size, encoder.patch_size, mask_patch_size)
        self.num_blocks = self.blocks_per_side**2
        self.num_masked = num_masked_blocks(self.num_blocks, mask_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        # SimMIM's ViT draws it from a normal with std 0.02 truncated at +-0.02 (one std).
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        self.head = nn.Linear(encoder.embed_dim, self.patch_size**2 * 3)  # PyTorch's default init, as SimMIM's conv

    def masks(self, noise: torch.Tensor, view: int = 0) -> torch.Tensor:
        """(B, L) patch mask of ``view`` (0 or 1), 1 = masked, from per-block noise."""
        return block_mask(noise, self.blocks_per_side, self.block_scale, self.num_masked, view)

    def random_noise(self, batch: int, device) -> torch.Tensor:
        return torch.rand(batch, self.num_blocks, device=device)

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """All L patches through the encoder, masked ones as the mask token: (B, 1 + L, D)."""
        return self.encoder(images, mask=mask, mask_token=self.mask_token)

    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens -> image (B, 3, H, W): the linear head per token, then each token's pixels in place."""
        g = self.encoder.grid_size
        x = self.head(tokens[:, 1:, :]).transpose(1, 2).reshape(tokens.shape[0], -1, g, g)  # channels (3, p, p) per token
        return F.pixel_shuffle(x, self.patch_size)

    def reconstruction(self, images: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        g, p = self.encoder.grid_size, self.patch_size
        pixel_mask = mask.view(-1, 1, g, g).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        return simmim_pixel_loss(images, self.predict(tokens), pixel_mask)

    def forward(self, view1, view2=None, noise=None, targets=None) -> dict[str, torch.Tensor]:
        if noise is None:
            noise = self.random_noise(view1.shape[0], view1.device)
        mask = self.masks(noise, 0)
        loss = self.reconstruction(view1, self.encode(view1, mask), mask)
        return {"loss": loss, "simmim_loss": loss.detach()}


class LUTSimMIM(BroaderContext, SimMIM):
    def __init__(
        self,
        encoder: ViTEncoder,
        head_hidden_dim: int = 4096,
        lam: float = 0.25,
        direction: str = "symmetric",
        **simmim_kwargs,
    ):
        super().__init__(encoder, **simmim_kwargs)  # first, so SimMIM's parameters draw the same init
        self.add_broader_context(encoder.embed_dim, head_hidden_dim, lam, direction)
        if self.symmetric and 2 * (self.num_blocks - self.num_masked) > self.num_blocks:
            raise ValueError(f"two disjoint visible sets need mask ratio >= 0.5, got {self.mask_ratio}")

    def online(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q = predictor(projector(mean of the unmasked patch tokens))."""
        return self.predictor(self.projector(pool_unmasked(tokens, mask)))

    def forward(self, view1, view2=None, noise=None, targets=None) -> dict[str, torch.Tensor]:
        """``targets``: ``TargetNetwork.targets`` outputs, t(view 2) [, t(view 1)]; None or lambda = 0: SimMIM."""
        if noise is None:
            noise = self.random_noise(view1.shape[0], view1.device)
        if targets is None or self.lam == 0:
            return super().forward(view1, noise=noise)
        mask1 = self.masks(noise, 0)
        if self.symmetric:
            mask2 = self.masks(noise, 1)
            # One encoder call for both views: the encoder has no batch statistics, so this is exact.
            tokens1, tokens2 = self.encode(torch.cat([view1, view2]), torch.cat([mask1, mask2])).chunk(2)
        else:
            tokens1 = self.encode(view1, mask1)
        rec = self.reconstruction(view1, tokens1, mask1)
        bc = bc_loss(self.online(tokens1, mask1), targets[0])
        if self.symmetric:
            bc = (bc + bc_loss(self.online(tokens2, mask2), targets[1])) / 2
        return {"loss": rec + self.lam * bc, "simmim_loss": rec.detach(), "bc_loss": bc.detach()}


def build_simmim(cfg) -> SimMIM:
    """SimMIM or LUTSimMIM from a ``TrainConfig`` (method simmim / lut_simmim)."""
    from lut_fast.models.vit import build_encoder

    m = cfg.model
    encoder = build_encoder(m.name, m.img_size, m.patch_size, depth=m.depth, embed_dim=m.embed_dim, num_heads=m.num_heads)
    kwargs = dict(mask_patch_size=m.resolved_mask_patch_size(), mask_ratio=m.mask_ratio)
    if cfg.method == "simmim":
        return SimMIM(encoder, **kwargs)
    return LUTSimMIM(encoder, head_hidden_dim=m.head_hidden_dim, lam=cfg.lut.resolved_lam(m.name),
                     direction=cfg.lut.direction, **kwargs)
