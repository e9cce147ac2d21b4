"""`lut-fast export mmseg`: the encoder in the key layouts segmentation toolkits load.

Two kinds of check, both run in CI:

* Key-level: the names and shapes each layout must have, written out below from
  mmsegmentation 1.2.2 (``mmseg/models/backbones/vit.py`` class ``VisionTransformer``
  with its ``TransformerEncoderLayer``, and ``mmseg/models/backbones/mae.py`` class
  ``MAE``, built on ``beit.py``'s ``BEiTTransformerEncoderLayer``), plus the
  position-embedding resize on a tiny model (32 px -> 64 px: grid 2x2 -> 4x4).
* Loading into the toolkit itself: mmsegmentation 1.2.2, mmengine and mmcv-lite
  install from wheels (the ``test`` extra), and the exported file is loaded through
  the backbones' own ``init_weights`` (``pretrained=FILE``, as a config does); the
  backbone then computes our encoder's features exactly. mmcv-lite ships mmcv
  without its compiled operators, which ``import mmseg`` names (for decode heads
  and losses, never for these backbones): when they are missing, ``mmcv.ops`` is
  replaced by a module whose every operator raises if called.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lut_fast.checkpoint import FORMAT, load_encoder
from lut_fast.errors import UserError
from lut_fast.export_seg import backbone_config, export_segmentation, resize_pos_embed, segmentation_state
from lut_fast.models.vit import ViTEncoder
from helpers import run_cli

# mmseg's backbones warn that `pretrained=` is deprecated (its own MAE config still sets it that way), mmcv-lite that
# it has no deformable attention, BEiT's relative-position code about meshgrid: noise for these tests.
pytestmark = pytest.mark.filterwarnings("ignore:DeprecationWarning. pretrained is deprecated", "ignore:torch.meshgrid",
                                        "ignore:Fail to import ``MultiScaleDeformableAttention``")

DIM, DEPTH, HEADS, PATCH = 64, 2, 2, 16  # tiny ViT: 32 px -> 2x2 grid, 64 px -> 4x4


def tiny_encoder(img_size: int = 32, seed: int = 0) -> ViTEncoder:
    torch.manual_seed(seed)
    encoder = ViTEncoder(img_size=img_size, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    with torch.no_grad():  # no zero biases / unit norms left: a misplaced tensor changes the output
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return encoder.eval()


@pytest.fixture
def checkpoint(tmp_path):
    """A lut-fast training checkpoint (online and momentum encoders differ) and its online encoder."""
    online, target = tiny_encoder(seed=0), tiny_encoder(seed=1)
    path = tmp_path / "last.pt"
    torch.save({"format": FORMAT, "step": 7, "optimizer": {}, "config": {"method": "lut", "model": {"num_heads": HEADS}},
                "model": {f"encoder.{k}": v for k, v in online.state_dict().items()},
                "target": {f"encoder.{k}": v for k, v in target.state_dict().items()}}, path)
    return path, online, target


def expected_mmseg_keys(layout: str, grid: int, hidden: int = 4 * DIM) -> dict[str, tuple]:
    """Parameter names and shapes of mmseg 1.2.2's backbone for the tiny ViT (see the module doc)."""
    keys = {"cls_token": (1, 1, DIM), "pos_embed": (1, 1 + grid * grid, DIM),
            "patch_embed.projection.weight": (DIM, 3, PATCH, PATCH),
            "patch_embed.projection.bias": (DIM,),  # VisionTransformer: with patch_bias=True; MAE: always
            "ln1.weight": (DIM,), "ln1.bias": (DIM,)}  # the final norm, built when final_norm=True
    for i in range(DEPTH):
        layer = f"layers.{i}."
        for norm in ("ln1", "ln2"):
            keys.update({f"{layer}{norm}.weight": (DIM,), f"{layer}{norm}.bias": (DIM,)})
        keys.update({f"{layer}ffn.layers.0.0.weight": (hidden, DIM), f"{layer}ffn.layers.0.0.bias": (hidden,),
                     f"{layer}ffn.layers.1.weight": (DIM, hidden), f"{layer}ffn.layers.1.bias": (DIM,)})
        if layout == "mmseg-vit":  # mmcv MultiheadAttention -> torch.nn.MultiheadAttention as `attn.attn`
            keys.update({f"{layer}attn.attn.in_proj_weight": (3 * DIM, DIM), f"{layer}attn.attn.in_proj_bias": (3 * DIM,),
                         f"{layer}attn.attn.out_proj.weight": (DIM, DIM), f"{layer}attn.attn.out_proj.bias": (DIM,)})
        else:  # BEiT-style attention (MAE: qkv bias as one Linear bias) and layer scale
            keys.update({f"{layer}attn.qkv.weight": (3 * DIM, DIM), f"{layer}attn.qkv.bias": (3 * DIM,),
                         f"{layer}attn.proj.weight": (DIM, DIM), f"{layer}attn.proj.bias": (DIM,),
                         f"{layer}gamma_1": (DIM,), f"{layer}gamma_2": (DIM,)})
            # relative_position_bias_table / relative_position_index: not written (MAE initialises them to zero)
    return keys


# Where each of our (timm-named) tensors must land, per layout.
SOURCE_OF = {
    "mmseg-vit": {"patch_embed.projection": "patch_embed.proj", "ln1": "norm", "ln1.": "norm1.", "ln2.": "norm2.",
                  "attn.attn.in_proj_": "attn.qkv.", "attn.attn.out_proj": "attn.proj",
                  "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"},
    "mmseg-mae": {"patch_embed.projection": "patch_embed.proj", "ln1": "norm", "ln1.": "norm1.", "ln2.": "norm2.",
                  "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"},
}


def source_key(key: str, layout: str) -> str:
    if not key.startswith("layers."):
        for new, old in SOURCE_OF[layout].items():
            if key.startswith(new + "."):
                return old + key[len(new):]
        return key
    _, index, rest = key.split(".", 2)
    for new, old in sorted(SOURCE_OF[layout].items(), key=lambda kv: -len(kv[0])):
        if rest.startswith(new):
            return f"blocks.{index}.{old}{rest[len(new):]}"
    raise AssertionError(f"no source for {key}")


@pytest.mark.parametrize("layout", ["mmseg-vit", "mmseg-mae"])
def test_mmseg_layouts_have_the_backbones_keys_shapes_and_our_values(checkpoint, tmp_path, layout):
    path, online, _ = checkpoint
    result = export_segmentation(path, tmp_path / "seg.pth", layout=layout, img_size=64)
    state = torch.load(result.path, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_mmseg_keys(layout, grid=4)
    ours = online.state_dict()
    for key, value in state.items():
        if key.endswith(("gamma_1", "gamma_2")):
            assert torch.equal(value, torch.ones(DIM)), key  # layer scale 1: blocks as ours, whatever init_values
        elif key != "pos_embed":
            assert torch.equal(value, ours[source_key(key, layout)]), key
    assert torch.equal(state["pos_embed"], resize_pos_embed(ours["pos_embed"], 4))
    assert (result.grid, result.source_grid, result.num_heads) == (4, 2, HEADS)


def test_pos_embed_resize_keeps_the_class_token_and_the_grid_orientation():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 2 * 2, DIM)
    assert torch.equal(resize_pos_embed(pos, 2), pos)  # identity size: values unchanged
    big = resize_pos_embed(pos, 4)
    assert big.shape == (1, 1 + 4 * 4, DIM)
    assert torch.equal(big[:, 0], pos[:, 0])  # class token kept
    # A field constant on the grid stays constant (bicubic weights sum to one) ...
    flat = torch.cat([pos[:, :1], pos[:, 1:2].expand(-1, 4, -1)], dim=1)
    assert torch.allclose(resize_pos_embed(flat, 4)[:, 1:], pos[:, 1:2].expand(-1, 16, -1), atol=1e-6)
    # ... and one varying along rows only (row-major tokens) still varies along rows only.
    rows = torch.zeros(1, 5, DIM)
    rows[0, 3:] = 1.0  # second grid row
    grid = resize_pos_embed(rows, 4)[0, 1:].reshape(4, 4, DIM)
    assert torch.allclose(grid, grid[:, :1].expand(-1, 4, -1))  # equal along each row
    assert grid[0, 0, 0] < grid[1, 0, 0] < grid[2, 0, 0] < grid[3, 0, 0]  # increasing down the columns


def test_mae_layout_is_the_mae_release_layout_and_loads_back(checkpoint, tmp_path):
    path, online, _ = checkpoint
    file = export_segmentation(path, tmp_path / "mae.pth", layout="mae", img_size=32).path
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert list(state) == ["model"]
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in online.state_dict().items()}
    # lut-fast's loader for MAE-style files (which, like MAE's, carry no head count); identity size: the same network
    encoder, info = load_encoder(file, num_heads=HEADS)
    assert info["kind"] == "mae-style"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(x), online(x))


def test_use_ema_exports_the_momentum_encoder(checkpoint, tmp_path):
    path, _, target = checkpoint
    result = export_segmentation(path, tmp_path / "ema.pth", layout="mmseg-mae", img_size=32, use_ema=True)
    state = torch.load(result.path, map_location="cpu", weights_only=True)
    assert torch.equal(state["layers.1.ffn.layers.1.weight"], target.state_dict()["blocks.1.mlp.fc2.weight"])


def test_clear_errors(checkpoint, tmp_path):
    path, _, _ = checkpoint
    not_vit = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, not_vit)
    with pytest.raises(UserError, match="not a ViT encoder"):
        export_segmentation(not_vit, tmp_path / "a.pth")
    with pytest.raises(UserError, match="not a multiple of the patch size 16"):
        export_segmentation(path, tmp_path / "b.pth", img_size=500)
    with pytest.raises(UserError, match="unknown layout 'beit'"):
        export_segmentation(path, tmp_path / "c.pth", layout="beit")
    existing = tmp_path / "old.pth"
    existing.write_bytes(b"an older export")
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        export_segmentation(path, existing)
    assert existing.read_bytes() == b"an older export"
    export_segmentation(path, existing, img_size=64, overwrite=True)
    with pytest.raises(UserError, match="no place for"):  # a weight no backbone has (here: LayerScale)
        segmentation_state({"blocks.0.ls1.gamma": torch.ones(DIM), "pos_embed": torch.zeros(1, 5, DIM)}, "mmseg-vit", 2)


def test_cli_writes_the_file_and_prints_the_config_lines(checkpoint, tmp_path):
    path, _, _ = checkpoint
    out = tmp_path / "seg.pth"
    proc = run_cli("export", "mmseg", str(path), str(out), "--img-size", "64")
    assert proc.returncode == 0, proc.stderr
    assert "pos_embed 2x2 -> 4x4" in proc.stdout
    assert f"model = dict(pretrained='{out}', backbone=dict(type='MAE', img_size=(64, 64), patch_size=16" in proc.stdout
    proc = run_cli("export", "mmseg", str(path), str(out), "--img-size", "64")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("lut-fast: error:") and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------- loading into mmsegmentation itself


@pytest.fixture(scope="module")
def mmseg_backbones():
    pytest.importorskip("mmseg", reason="mmsegmentation is installed by the test extra: pip install -e '.[test]'")
    try:
        import mmcv.ops  # noqa: F401 - a full mmcv build has them
    except ImportError:  # mmcv-lite: stand-ins that raise if a compiled operator is ever called
        def unavailable(*args, **kwargs):
            raise RuntimeError("compiled mmcv operator: not in mmcv-lite")

        def any_operator(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return unavailable

        ops = types.ModuleType("mmcv.ops")
        ops.__getattr__ = any_operator
        sys.modules["mmcv.ops"] = ops
    from mmseg.models.backbones import MAE, VisionTransformer

    return {"mmseg-vit": VisionTransformer, "mmseg-mae": MAE}


@pytest.mark.parametrize("layout", ["mmseg-vit", "mmseg-mae"])
def test_exported_file_loads_into_mmsegmentation_and_computes_our_features(checkpoint, tmp_path, mmseg_backbones, layout):
    path, online, _ = checkpoint
    result = export_segmentation(path, tmp_path / "seg.pth", layout=layout, img_size=64)
    kwargs = dict(img_size=64, patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS, mlp_ratio=4,
                  norm_cfg=dict(type="LN", eps=1e-6), final_norm=True, out_indices=[DEPTH - 1], pretrained=str(result.path))
    extra = {"patch_bias": True} if layout == "mmseg-vit" else {"init_values": 0.1}  # gamma from the file, not 0.1
    backbone = mmseg_backbones[layout](**kwargs, **extra)
    backbone.init_weights()  # mmseg's own loading path (pos_embed already at the 4x4 grid: no resize)
    backbone.eval()
    loaded, file = backbone.state_dict(), torch.load(result.path, map_location="cpu", weights_only=True)
    assert set(file) <= set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in file.items())
    assert {k.split(".")[-1] for k in set(loaded) - set(file)} <= {"relative_position_bias_table", "relative_position_index"}
    # Same network: our encoder at 64 px with the resized positions gives the same patch features.
    ours = ViTEncoder(img_size=64, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    ours.load_state_dict({**online.state_dict(), "pos_embed": file["pos_embed"]})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ours.eval()(x)[:, 1:].reshape(2, 4, 4, DIM).permute(0, 3, 1, 2)
        (features,) = backbone(x)
    torch.testing.assert_close(features, expected, atol=2e-5, rtol=1e-5)
    assert f"model = dict(pretrained='{result.path}'" in backbone_config(result)


@pytest.mark.parametrize("layout", ["mmseg-vit", "mmseg-mae"])
def test_our_pos_embed_resize_is_the_one_mmsegmentation_applies(checkpoint, tmp_path, mmseg_backbones, layout):
    """A 32-px export loaded into a 64-px backbone is resized by mmseg itself: same table as our 64-px export."""
    path, _, _ = checkpoint
    small = export_segmentation(path, tmp_path / "small.pth", layout=layout, img_size=32)
    big = export_segmentation(path, tmp_path / "big.pth", layout=layout, img_size=64)
    extra = {"patch_bias": True} if layout == "mmseg-vit" else {}
    backbone = mmseg_backbones[layout](img_size=64, patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
                                       norm_cfg=dict(type="LN", eps=1e-6), pretrained=str(small.path), **extra)
    backbone.init_weights()
    ours = torch.load(big.path, map_location="cpu", weights_only=True)["pos_embed"]
    torch.testing.assert_close(backbone.state_dict()["pos_embed"], ours, atol=1e-6, rtol=1e-6)
