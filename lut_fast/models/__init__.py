"""ViT encoder, MAE, LUT: one readable file per model idea; ``build_model`` makes one from a config."""

from __future__ import annotations

from lut_fast.models.lut import LUT
from lut_fast.models.mae import MaskedAutoencoder
from lut_fast.models.vit import PRESETS, ViTEncoder, build_encoder


def build_model(cfg) -> MaskedAutoencoder:
    """MAE, LUT, SimMIM or LUT on SimMIM from a ``TrainConfig``."""
    if cfg.method in ("simmim", "lut_simmim"):
        from lut_fast.models.simmim import build_simmim

        return build_simmim(cfg)
    m = cfg.model
    encoder = build_encoder(m.name, m.img_size, m.patch_size, depth=m.depth, embed_dim=m.embed_dim, num_heads=m.num_heads)
    mae_kwargs = dict(
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
        mask_ratio=m.mask_ratio,
        norm_pix_loss=m.norm_pix_loss,
    )
    if cfg.method == "mae":
        return MaskedAutoencoder(encoder, **mae_kwargs)
    return LUT(
        encoder,
        head_hidden_dim=m.head_hidden_dim,
        lam=cfg.lut.resolved_lam(m.name),
        direction=cfg.lut.direction,
        **mae_kwargs,
    )


__all__ = ["LUT", "MaskedAutoencoder", "ViTEncoder", "PRESETS", "build_encoder", "build_model"]
