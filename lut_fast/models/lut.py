"""LUT = MAE + projector/predictor heads + a cosine loss toward a momentum target.

Per image (docs/METHOD.md, sections 3-7): one shuffle, view 1 keeps ids[:K], view 2 keeps
ids[K:2K]. The student encodes both visible sets (one batched encoder call:
the encoder has no batch statistics, so this is exact), reconstructs view 1
with the MAE decoder, pools each view's visible patch tokens and maps them
through projector and predictor *separately* (BatchNorm statistics per view).
The target (``ema.TargetNetwork``) encodes the full other view.

    symmetric (official):  bc = (bc(q(view1 masked), t(view2)) + bc(q(view2 masked), t(view1))) / 2
    one_way (paper text):  bc = bc(q(view1 masked), t(view2))
    loss = mae(view1) + lambda * bc
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lut_fast.losses import bc_loss
from lut_fast.masking import keep_ids, shuffle_from_noise
from lut_fast.models.mae import MaskedAutoencoder
from lut_fast.models.vit import ViTEncoder, init_weights, pool_patch_tokens


def mlp_head(dim: int, hidden: int) -> nn.Sequential:
    """Linear(D, hidden, no bias) -> BatchNorm -> ReLU -> Linear(hidden, D, no bias)."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, dim, bias=False),
    )


class BroaderContext:
    """What LUT adds to a masked-image model (MAE here, SimMIM in ``models/simmim.py``): lambda, the
    direction of the bc term, and the projector and predictor heads."""

    def add_broader_context(self, dim: int, head_hidden_dim: int, lam: float, direction: str) -> None:
        if direction not in ("symmetric", "one_way"):
            raise ValueError(f"direction must be symmetric or one_way, got {direction!r}")
        self.lam = lam
        self.direction = direction
        self.projector = mlp_head(dim, head_hidden_dim)
        self.predictor = mlp_head(dim, head_hidden_dim)
        # The official model runs its weight-init pass after building the heads, so they are
        # xavier-uniform too (PyTorch's default would start the second layer about 2x smaller
        # at ViT-B); BatchNorm keeps weight 1, bias 0.
        self.projector.apply(init_weights)
        self.predictor.apply(init_weights)

    @property
    def symmetric(self) -> bool:
        return self.direction == "symmetric"


class LUT(BroaderContext, MaskedAutoencoder):
    def __init__(
        self,
        encoder: ViTEncoder,
        head_hidden_dim: int = 4096,
        lam: float = 0.25,
        direction: str = "symmetric",
        **mae_kwargs,
    ):
        super().__init__(encoder, **mae_kwargs)
        self.add_broader_context(encoder.embed_dim, head_hidden_dim, lam, direction)

    def online(self, latent: torch.Tensor) -> torch.Tensor:
        """q = predictor(projector(mean of visible patch tokens))."""
        return self.predictor(self.projector(pool_patch_tokens(latent)))

    def forward(self, view1, view2=None, noise=None, targets=None) -> dict[str, torch.Tensor]:
        """``targets``: target outputs for view 2 (and view 1 when symmetric), from ``TargetNetwork.targets``.

        With ``targets=None`` (or lambda = 0) this is exactly MAE.
        """
        if noise is None:
            noise = torch.rand(view1.shape[0], self.encoder.num_patches, device=view1.device)
        if targets is None or self.lam == 0:
            return super().forward(view1, noise=noise)
        ids_shuffle, ids_restore = shuffle_from_noise(noise)
        k = self.num_keep
        if self.symmetric:
            both = self.encoder(torch.cat([view1, view2]), torch.cat([keep_ids(ids_shuffle, k, 0), keep_ids(ids_shuffle, k, 1)]))
            latent1, latent2 = both.chunk(2)
        else:
            latent1 = self.encoder(view1, keep_ids(ids_shuffle, k, 0))
        mae = self.reconstruction(view1, latent1, ids_restore)
        bc = bc_loss(self.online(latent1), targets[0])
        if self.symmetric:
            bc = (bc + bc_loss(self.online(latent2), targets[1])) / 2
        return {"loss": mae + self.lam * bc, "mae_loss": mae.detach(), "bc_loss": bc.detach()}
