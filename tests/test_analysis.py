"""Analyses: attention weights, average attention distance, feature spectrum, attention maps (CPU, seconds)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from PIL import Image

from lut_fast.analysis.attention_distance import average_attention_distance, distance_matrix, run_attention_distance
from lut_fast.analysis.attention_maps import parse_query, run_attention_maps
from lut_fast.analysis.common import attention_weights, walk_blocks
from lut_fast.analysis.spectrum import covariance_spectrum, run_spectrum
from lut_fast.checkpoint import encoder_state, load_encoder
from lut_fast.datasets.builtin import builtin_path
from lut_fast.errors import UserError
from lut_fast.models.vit import ViTEncoder

from helpers import run_cli

ARCH = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def _encoder(seed: int = 0) -> ViTEncoder:
    torch.manual_seed(seed)
    return ViTEncoder(**ARCH).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny random encoders in the three accepted formats (no training needed to draw plots)."""
    d = tmp_path_factory.mktemp("ckpts")
    a, b = _encoder(0).state_dict(), _encoder(1).state_dict()
    # lut-fast pre-training checkpoint (encoder under "encoder.", config with the heads)
    lut = {"format": "lut-fast/1", "step": 5, "target": None, "config": {"method": "mae", "model": {"name": "vit_tiny", "num_heads": 4}},
           "model": {**{f"encoder.{k}": v for k, v in a.items()}, "decoder_embed.weight": torch.zeros(8, 64)}}
    (d / "run_a" / "checkpoints").mkdir(parents=True)
    torch.save(lut, d / "run_a" / "checkpoints" / "last.pt")
    torch.save(b, d / "b_timm.pth")  # exported timm encoder (width 64: heads need --num-heads)
    torch.save({"model": {**b, "mask_token": torch.zeros(1, 1, 64), "decoder_pred.weight": torch.zeros(4, 4)}}, d / "b_mae.pth")
    return {"lut": d / "run_a" / "checkpoints" / "last.pt", "timm": d / "b_timm.pth", "mae": d / "b_mae.pth", "dir": d}


# ---------------------------------------------------------------- attention weights


def test_attention_weights_reproduce_the_fused_block():
    enc = _encoder()
    x = enc.tokens(torch.randn(2, 3, 32, 32))
    blk = enc.blocks[0]
    a = attention_weights(blk, x)
    assert a.shape == (2, 4, 17, 17)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 17))
    # softmax(QK^T/sqrt(d)) @ V through the block's projection == timm's fused attention output
    h = blk.norm1(x)
    v = blk.attn.qkv(h).reshape(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)[2]
    manual = blk.attn.proj((a @ v).transpose(1, 2).reshape(2, 17, 64))
    torch.testing.assert_close(manual, blk.attn(h), atol=1e-5, rtol=1e-4)


def test_walk_blocks_matches_the_encoder_forward():
    enc = _encoder()
    img = torch.randn(2, 3, 32, 32)
    attns, tokens = walk_blocks(enc, img, want_attention=[-1], want_tokens=True)
    assert set(attns) == {1} and len(tokens) == 2
    torch.testing.assert_close(enc.norm(tokens[-1]), enc(img))


# ---------------------------------------------------------------- average attention distance (Eq. 4)


def _hand_mean_pairwise(grid: int) -> float:
    centers = [((c + 0.5) / grid, (r + 0.5) / grid) for r in range(grid) for c in range(grid)]
    return sum(math.dist(p, q) for p, q in itertools.product(centers, centers)) / len(centers) ** 2


@pytest.mark.parametrize("grid", [2, 3, 4])
def test_aad_uniform_attention_is_the_mean_pairwise_distance(grid):
    n = grid * grid
    patches_only = torch.full((1, 2, n, n), 1.0 / n)
    assert average_attention_distance(patches_only, grid, num_prefix_tokens=0).tolist() == pytest.approx([_hand_mean_pairwise(grid)] * 2)
    # with a cls token: uniform over all N + 1 tokens; renormalised over patches it is the same number
    with_cls = torch.full((3, 1, n + 1, n + 1), 1.0 / (n + 1))
    assert average_attention_distance(with_cls, grid).item() == pytest.approx(_hand_mean_pairwise(grid))
    # without renormalisation, the cls share counts as distance 0
    raw = average_attention_distance(with_cls, grid, renormalize=False).item()
    assert raw == pytest.approx(_hand_mean_pairwise(grid) * n / (n + 1))


def test_aad_identity_attention_is_zero_and_a_hand_built_matrix():
    assert average_attention_distance(torch.eye(10).expand(2, 3, 10, 10), 3).tolist() == pytest.approx([0.0] * 3)
    # 2x2 grid, centres 1/4 and 3/4: each query puts 0.5 on itself and 0.5 on its horizontal neighbour
    a = torch.zeros(1, 1, 4, 4)
    for i, j in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        a[0, 0, i, i] = a[0, 0, i, j] = 0.5
    assert average_attention_distance(a, 2, num_prefix_tokens=0).item() == pytest.approx(0.25)
    # diagonal neighbour: distance sqrt(2)/2, weight 1
    d = torch.zeros(1, 1, 4, 4)
    for i, j in [(0, 3), (3, 0), (1, 2), (2, 1)]:
        d[0, 0, i, j] = 1.0
    assert average_attention_distance(d, 2, num_prefix_tokens=0).item() == pytest.approx(math.sqrt(2) / 2)
    assert distance_matrix(2)[0, 3].item() == pytest.approx(math.sqrt(2) / 2)


# ---------------------------------------------------------------- spectrum


def test_spectrum_recovers_known_singular_values():
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))  # random rotation
    x = torch.randn(40000, 6, generator=g, dtype=torch.float64) @ torch.diag(s.sqrt()) @ q.T + 3.0  # offset: centred away
    est = covariance_spectrum(x)
    assert torch.allclose(est, s, rtol=0.05), est
    # rank-deficient features: trailing singular values vanish
    low = covariance_spectrum(torch.randn(500, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64))
    assert (low[2:] < 1e-10).all() and (low[:2] > 1e-3).all()


# ---------------------------------------------------------------- commands (PNG + JSON), all checkpoint formats


def test_encoder_formats_load_to_the_same_weights(ckpts):
    a, info = load_encoder(ckpts["lut"])
    assert info["num_heads"] == 4 and info["depth"] == 2 and info["img_size"] == 32 and info["kind"] == "lut-fast"
    b_timm, i_timm = load_encoder(ckpts["timm"], num_heads=4)
    b_mae, i_mae = load_encoder(ckpts["mae"], num_heads=4)
    assert i_timm["kind"] == "timm" and i_mae["kind"] == "mae-style"
    for k, v in b_timm.state_dict().items():
        torch.testing.assert_close(v, b_mae.state_dict()[k])
    assert set(encoder_state(torch.load(ckpts["mae"]))) == set(b_timm.state_dict())
    with pytest.raises(UserError, match="no target"):
        load_encoder(ckpts["lut"], use_ema=True)


def test_attention_distance_and_spectrum_write_png_and_json(ckpts, tmp_path):
    data = builtin_path()
    r = run_attention_distance([ckpts["lut"], ckpts["mae"]], out=tmp_path, data=str(data), max_images=12, num_heads=4,
                               batch_size=6, workers=0, device="cpu", show_progress=False)
    assert (tmp_path / "attention_distance.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "attention_distance.json").read_text())
    assert [c["label"] for c in saved["checkpoints"]] == ["run_a", "b_mae"]
    aad = torch.tensor(saved["checkpoints"][0]["aad"])
    assert aad.shape == (2, 4) and (aad > 0).all() and (aad < math.sqrt(2)).all()
    assert r["images"] == 12

    s = run_spectrum([ckpts["lut"], ckpts["timm"]], out=tmp_path, data=str(data), max_images=20, num_heads=4, labels="A,B",
                     batch_size=10, workers=0, device="cpu", show_progress=False)
    assert (tmp_path / "spectrum.png").stat().st_size > 5000
    assert len(s["checkpoints"][0]["singular_values"]) == 2 and len(s["checkpoints"][0]["singular_values"][0]) == 64
    assert len(s["log_gap"]) == 2 and s["log_gap_definition"].startswith("ln sigma(B)")
    with pytest.raises(UserError, match="at most two"):
        run_spectrum([ckpts["lut"]] * 3, out=tmp_path, data=str(data))


def test_attention_maps_png_and_query_checks(ckpts, tmp_path):
    img = tmp_path / "img.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    r = run_attention_maps([ckpts["lut"], ckpts["mae"]], out=tmp_path, image=str(img), query="1,2", num_heads=4, device="cpu")
    assert (tmp_path / "attention_maps.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "attention_maps.json").read_text())
    maps = torch.tensor(saved["checkpoints"][0]["attention"])
    assert maps.shape == (4, 4, 4) and saved["checkpoints"][1]["query"] == [1, 2]
    mass = maps.sum(dim=(1, 2))  # attention on the patches; the cls token takes the rest
    assert ((mass > 0) & (mass <= 1 + 1e-6)).all()
    assert tuple(r["query_position"]) == (0.375, 0.625)
    assert parse_query(None) is None and parse_query(" 3, 4 ") == (3, 4)
    for bad in ("3", "a,b", "1,2,3", "-1,0"):
        with pytest.raises(UserError, match="--query"):
            parse_query(bad)
    with pytest.raises(UserError, match="outside the 4x4"):
        run_attention_maps([ckpts["lut"]], out=tmp_path, image=str(img), query="4,0", device="cpu")
    with pytest.raises(UserError, match="image not found"):
        run_attention_maps([ckpts["lut"]], out=tmp_path, image=str(tmp_path / "missing.png"))


def test_cli_errors_are_one_line_and_help_shows_defaults(ckpts, tmp_path):
    from typer.testing import CliRunner

    from lut_fast.analysis.cli import analyze_app

    # the installed entry point: a UserError is one line on stderr, exit code 2
    r = run_cli("analyze", "attention-maps", str(ckpts["lut"]), "--image", str(tmp_path / "nope.jpg"), "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "image not found" in r.stderr, r.stderr
    runner = CliRunner()
    res = runner.invoke(analyze_app, ["attention-distance", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    assert isinstance(res.exception, UserError) and "checkpoint not found" in str(res.exception)
    res = runner.invoke(analyze_app, ["attention-maps", str(ckpts["lut"]), "--image", str(tmp_path), "--query", "x"])
    assert isinstance(res.exception, UserError)
    for cmd, default in (("spectrum", "5000"), ("attention-distance", "1000"), ("attention-maps", "-1")):
        res = runner.invoke(analyze_app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0 and default in res.output, res.output
