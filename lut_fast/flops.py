"""Analytic training FLOPs per image for MAE and LUT, counted from the architecture.

Convention (the one that reproduces docs/METHOD.md's ViT-B figures (section 12), 58.7 / 155.6 /
93.9 GF per image, to within 0.1 %):

* 1 multiply-accumulate = 2 FLOPs; only matrix products are counted (linear
  layers, the patch-embedding convolution, attention). LayerNorm, softmax,
  GELU, BatchNorm, ReLU, bias adds, position embeddings, gathers, the losses
  and the optimizer / EMA update are left out (together well under 1 %).
* A transformer block on N tokens of width D with MLP width 4D (ratio r):
  qkv 2*N*D*3D + attention scores QK^T 2*N*N*D + attention-weighted values
  AV 2*N*N*D + output projection 2*N*D*D + MLP 2 * 2*N*D*rD.
  Attention is counted over all heads (h heads of width D/h multiply out to D).
* Token counts are what this code computes: the cls token is counted
  (N = K + 1 for a student view, L + 1 for the target and the decoder); the
  patch embedding runs on all L patches before masking (``ViTEncoder.tokens``);
  ``decoder_embed`` maps K + 1 tokens, ``decoder_pred`` L + 1 tokens.
* LUT heads: projector Linear(D, H) + Linear(H, D), predictor the same, per
  student view; the target applies its projector once per view.
* Training = forward + backward, backward = 2 x forward, for everything that
  receives gradients (student encoder incl. patch embedding, decoder, heads).
  The momentum target runs forward only (no_grad): in symmetric mode on the
  full L + 1 tokens of both views, in one-way mode on view 2 only.

* SimMIM keeps every patch in the encoder: a student view runs on L + 1 tokens,
  and its linear head maps the L patch tokens to p*p*3 pixels (view 1 only, the
  one reconstructed). LUT on SimMIM adds the heads and the target exactly as LUT
  does (symmetric: both views through the student; one-way: view 1 only).

``torch.utils.flop_counter.FlopCounterMode`` on a real forward + backward
agrees within about 0.5 % (it does not charge the patch embedding's input
gradient, which is never computed): see ``tests/test_flops.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The paper-scale reference figures (GFLOPs per image, forward + backward) (docs/METHOD.md, "12. Compute cost").
REFERENCE_VIT_B_GFLOPS = {"mae": 58.7, "lut_symmetric": 155.6, "lut_one_way": 93.9}


@dataclass(frozen=True)
class ArchDims:
    """The numbers that set the FLOP count (defaults: ViT-B/16 at 224 px, MAE decoder, 4096-wide heads)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    head_hidden: int = 4096
    mask_ratio: float = 0.75

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_visible(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))  # masking.num_visible

    @classmethod
    def from_config(cls, cfg) -> "ArchDims":
        """From a ``TrainConfig`` (preset dims, with the config's overrides)."""
        from lut_fast.models.vit import PRESETS

        m = cfg.model
        preset = PRESETS[m.name]
        return cls(
            img_size=m.img_size,
            patch_size=m.patch_size,
            embed_dim=m.embed_dim or preset["embed_dim"],
            depth=m.depth or preset["depth"],
            decoder_dim=m.decoder_embed_dim,
            decoder_depth=m.decoder_depth,
            head_hidden=m.head_hidden_dim,
            mask_ratio=m.mask_ratio,
        )


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """One pre-norm transformer block, forward: qkv, QK^T, AV, projection, MLP."""
    hidden = int(dim * mlp_ratio)
    qkv = linear_flops(tokens, dim, 3 * dim)
    scores = 2 * tokens * tokens * dim
    weighted = 2 * tokens * tokens * dim
    proj = linear_flops(tokens, dim, dim)
    mlp = linear_flops(tokens, dim, hidden) + linear_flops(tokens, hidden, dim)
    return qkv + scores + weighted + proj + mlp


def patch_embed_flops(d: ArchDims) -> int:
    return linear_flops(d.num_patches, 3 * d.patch_size**2, d.embed_dim)


def encoder_flops(d: ArchDims, tokens: int) -> int:
    """Patch embedding (all L patches) + ``depth`` blocks on ``tokens`` tokens (cls included)."""
    return patch_embed_flops(d) + d.depth * block_flops(tokens, d.embed_dim, d.mlp_ratio)


def decoder_flops(d: ArchDims) -> int:
    n_vis, n_all = d.num_visible + 1, d.num_patches + 1
    embed = linear_flops(n_vis, d.embed_dim, d.decoder_dim)
    blocks = d.decoder_depth * block_flops(n_all, d.decoder_dim, d.mlp_ratio)
    pred = linear_flops(n_all, d.decoder_dim, 3 * d.patch_size**2)
    return embed + blocks + pred


def head_flops(d: ArchDims) -> int:
    """One projector (or predictor) on one pooled vector: Linear(D, H) + Linear(H, D)."""
    return 2 * linear_flops(1, d.embed_dim, d.head_hidden)


@dataclass(frozen=True)
class TrainingFlops:
    """Per image. ``student_forward`` is charged 3x (forward + backward), ``target_forward`` 1x."""

    method: str  # mae | lut_symmetric | lut_one_way | simmim | lut_simmim_symmetric | lut_simmim_one_way
    student_forward: int
    target_forward: int

    @property
    def total(self) -> int:
        return 3 * self.student_forward + self.target_forward

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "gflops": round(self.gflops, 4)}


def simmim_head_flops(d: ArchDims) -> int:
    """SimMIM's linear prediction head on the L patch tokens."""
    return linear_flops(d.num_patches, d.embed_dim, 3 * d.patch_size**2)


def with_broader_context(label: str, d: ArchDims, student_view: int, reconstruction: int, direction: str) -> TrainingFlops:
    """A masked-image student plus LUT's term: projector + predictor per student view, and the target
    (encoder on all L + 1 tokens + projector) once per view; symmetric: both views, one-way: view 1."""
    views = {"symmetric": 2, "one_way": 1}.get(direction)
    if views is None:
        raise ValueError(f"direction must be symmetric or one_way, got {direction!r}")
    target_view = encoder_flops(d, d.num_patches + 1) + head_flops(d)
    student = views * student_view + reconstruction + views * 2 * head_flops(d)
    return TrainingFlops(f"{label}_{direction}", student, views * target_view)


def training_flops(d: ArchDims, method: str = "mae", direction: str = "symmetric") -> TrainingFlops:
    """Training FLOPs per image (forward + backward) of one MAE, LUT, SimMIM or LUT-on-SimMIM step."""
    if method in ("mae", "lut"):  # the student encodes the K visible patches (+ cls); the decoder reconstructs
        student_view, reconstruction = encoder_flops(d, d.num_visible + 1), decoder_flops(d)
    elif method in ("simmim", "lut_simmim"):  # all L patches (+ cls); the linear head reconstructs
        student_view, reconstruction = encoder_flops(d, d.num_patches + 1), simmim_head_flops(d)
    else:
        raise ValueError(f"method must be mae, lut, simmim or lut_simmim, got {method!r}")
    if method in ("mae", "simmim"):
        return TrainingFlops(method, student_view + reconstruction, 0)
    return with_broader_context(method, d, student_view, reconstruction, direction)


def flops_per_image(cfg) -> TrainingFlops:
    """Training FLOPs per image for a ``TrainConfig`` (its method, LUT direction and model dims)."""
    return training_flops(ArchDims.from_config(cfg), cfg.method, cfg.lut.direction)
