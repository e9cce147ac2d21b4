"""Evaluation: k-NN, linear probe, fine-tuning, checkpoint formats, splits (CPU, built-in dataset).

One tiny LUT encoder is pre-trained once per module (PRETRAIN below) and shared.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from lut_fast.checkpoint import encoder_state, export_timm_encoder, load_encoder, load_file
from lut_fast.config import load_config
from lut_fast.datasets.builtin import builtin_path
from lut_fast.errors import UserError
from lut_fast.evaluation.common import resolve_splits
from lut_fast.evaluation.finetune import classifier_from_encoder, recipe_for, run_finetune
from lut_fast.evaluation.knn import knn_scores, run_knn
from lut_fast.evaluation.linear import run_linear
from lut_fast.train import train

from helpers import run_cli

# A briefly pre-trained tiny LUT: 64 px, patch 8, width 96, 2 blocks, 100 steps (~1 min on 2 cores).
PRETRAIN_FLAGS = {"method": "lut", "model.img_size": 64, "model.patch_size": 8, "optim.batch_size": 64,
                  "optim.max_steps": 100, "optim.epochs": 100, "optim.warmup_epochs": 5, "run.device": "cpu"}
PRETRAIN_SETS = ["model.depth=2", "model.embed_dim=96", "model.num_heads=3", "model.decoder_embed_dim=64",
                 "model.decoder_depth=1", "model.decoder_num_heads=4", "model.head_hidden_dim=128", "optim.lr=2e-3",
                 "data.num_workers=2", "run.progress=false", "run.log_every=50"]
FAST = dict(workers=0, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    threads = torch.get_num_threads()
    try:
        result = train(load_config(None, {**PRETRAIN_FLAGS, "run.out_dir": str(out)}, PRETRAIN_SETS))
    finally:
        torch.set_num_threads(threads)
    return result.last_checkpoint


# ---------------------------------------------------------------- k-NN


def test_knn_votes_by_hand():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[1.0, 0.05], [0.2, 1.0]])
    s = knn_scores(train_x, train_y, q, num_classes=2, k=3, temperature=0.1)
    # by hand: cosine of each of the 3 nearest, weight exp(cos / T), summed per class
    cos = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    top, idx = cos.topk(3, dim=1)
    expected = torch.zeros(2, 2)
    for r in range(2):
        for c, i in zip(top[r], idx[r]):
            expected[r, train_y[i]] += torch.exp(c / 0.1)
    torch.testing.assert_close(s, expected)
    assert s.argmax(1).tolist() == [0, 1]
    assert knn_scores(train_x, train_y, q, 2, k=100).shape == (2, 2)  # k > N is clipped


@pytest.mark.slow
def test_knn_pretrained_and_random_init_are_above_chance(pretrained, tmp_path):
    pre = run_knn(pretrained, out=tmp_path / "pre", **FAST)
    rand = run_knn(pretrained, out=tmp_path / "rand", random_init=True, **FAST)
    saved = json.loads((tmp_path / "pre" / "knn.json").read_text())
    assert saved["top1"] == pre["top1"] and saved["k"] == 20 and saved["data"]["val_images"] == 160
    print(f"k-NN top-1: pre-trained {pre['top1']:.1f}%, random init {rand['top1']:.1f}%")
    # At this budget (100 CPU steps of a 2-block encoder) pre-training does not reliably beat random
    # features: over seeds 0-2 the pre-trained k-NN measured 17.5-24.4 % against 20.0 % at random init
    # (chance: 10 %). So the test pins what the budget does show: the pre-trained features are not the
    # random ones, and both score well above chance (a broken encoder or k-NN lands near 10 %).
    assert pre["top1"] != rand["top1"] or pre["top5"] != rand["top5"]
    assert min(pre["top1"], rand["top1"]) > 14.0, (pre["top1"], rand["top1"])


def test_random_init_baseline_is_a_function_of_its_seed(tmp_path):
    """--random-init-seed picks the random network: the same seed gives the same weights, another seed
    other weights, and the seed is recorded (so the features cache tells the baselines apart)."""
    from lut_fast.models.vit import ViTEncoder

    enc = ViTEncoder(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    file = tmp_path / "enc.pth"
    torch.save(enc.state_dict(), file)  # a timm-style encoder state dict

    def weights(**kw):
        encoder, info = load_encoder(file, random_init=True, **kw)
        return torch.cat([p.detach().flatten() for p in encoder.parameters()]), info

    w0, info0 = weights()
    w0b, _ = weights(random_init_seed=0)
    w1, info1 = weights(random_init_seed=1)
    assert torch.equal(w0, w0b) and not torch.equal(w0, w1)
    assert (info0["random_init_seed"], info1["random_init_seed"]) == (0, 1)
    trained, info = load_encoder(file)
    assert info["random_init_seed"] is None
    torch.testing.assert_close(trained.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)


# ---------------------------------------------------------------- checkpoint formats


@pytest.mark.slow
def test_every_checkpoint_format_gives_the_same_features(pretrained, tmp_path):
    timm_file = export_timm_encoder(pretrained, tmp_path / "enc.pth")
    mae_file = tmp_path / "mae_style.pth"
    ckpt = load_file(pretrained)
    torch.save({"model": {**encoder_state(ckpt), "mask_token": torch.zeros(1), "decoder_embed.weight": torch.zeros(1)}}, mae_file)
    samples = resolve_splits(None).val[:24]
    from lut_fast.evaluation.common import extract_features

    ref = None
    # width 96 is no timm preset: files without a config need the heads (the lut-fast checkpoint has them)
    assert load_encoder(timm_file)[1]["num_heads"] == 1
    for f, heads in ((pretrained, None), (timm_file, 3), (mae_file, 3)):
        enc, info = load_encoder(f, num_heads=heads)
        assert (info["img_size"], info["patch_size"], info["embed_dim"], info["depth"], info["num_heads"]) == (64, 8, 96, 2, 3)
        feats, _ = extract_features(enc, samples, workers=0)
        ref = feats if ref is None else ref
        torch.testing.assert_close(feats, ref)
    ema, info = load_encoder(pretrained, use_ema=True)
    assert info["use_ema"] and not torch.equal(ema.blocks[0].attn.qkv.weight, load_encoder(pretrained)[0].blocks[0].attn.qkv.weight)
    with pytest.raises(UserError, match="--use-ema needs"):
        load_encoder(timm_file, use_ema=True)
    with pytest.raises(UserError, match="not found"):
        load_encoder(tmp_path / "missing.pt")
    # the encoder loads into timm's ViT (fine-tuning model) and gives the same pooled features
    enc, info = load_encoder(timm_file, num_heads=3)
    model = classifier_from_encoder(enc, info, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), enc(x)[:, 1:].mean(1))


# ---------------------------------------------------------------- linear probe


@pytest.mark.slow
def test_linear_probe_end_to_end_with_feature_cache(pretrained, tmp_path):
    first = run_linear(pretrained, out=tmp_path, epochs=30, **FAST)
    assert (tmp_path / "linear.json").exists() and (tmp_path / "linear_head.pt").exists()
    assert not first["features_from_cache"] and len(first["history"]) == 30 and "top5" in first
    assert first["top1"] > 14.0  # 10 classes: above chance (10 %); 15.6-26.9 % measured over seeds at this budget
    head = torch.load(tmp_path / "linear_head.pt")
    assert set(head["head"]) >= {"0.running_mean", "1.weight", "1.bias"} and "0.weight" not in head["head"]  # BN without affine
    t0 = time.perf_counter()
    again = run_linear(pretrained, out=tmp_path, epochs=30, **FAST)
    assert again["features_from_cache"] and again["top1"] == first["top1"]
    assert time.perf_counter() - t0 < first["seconds"]


def test_linear_head_trainer_and_lars_step():
    from lut_fast.evaluation.linear import LARS, train_linear_probe

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 3
    y, yv = torch.arange(5).repeat(60), torch.arange(5).repeat(20)
    x, xv = centers[y] + torch.randn(300, 32, generator=g), centers[yv] + torch.randn(100, 32, generator=g)
    _, hist = train_linear_probe(x, y, xv, yv, 5, epochs=15, batch_size=64, warmup_epochs=2)
    assert hist[-1]["top1"] > 95.0 and len(hist) == 15
    # one LARS step by hand (MoCo v3 / MAE): trust ratio and weight decay on matrices only
    w, b = torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))
    w.grad, b.grad = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    w0, b0 = w.detach().clone(), b.detach().clone()
    LARS([w, b], lr=0.5, weight_decay=0.1, trust_coefficient=0.001).step()
    d = w.grad + 0.1 * w0
    torch.testing.assert_close(w.detach(), w0 - 0.5 * (0.001 * w0.norm() / d.norm()) * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * b.grad)


# ---------------------------------------------------------------- fine-tuning


@pytest.mark.slow
def test_finetune_end_to_end_writes_model_and_metrics(pretrained, tmp_path):
    r = run_finetune(pretrained, out=tmp_path, max_steps=4, batch_size=16, **FAST)
    assert r["steps"] == 4 and {"top1", "top5"} <= set(r)
    saved = json.loads((tmp_path / "finetune.json").read_text())
    assert saved["recipe"]["layer_decay"] == 0.75 and saved["recipe"]["mixup"] == 0.8 and saved["recipe"]["randaug"].startswith("rand-m9")
    assert (tmp_path / "finetune_log.jsonl").read_text().count("\n") == 1
    ft = torch.load(tmp_path / "finetuned.pt", weights_only=False)
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**ft["timm_kwargs"])
    model.load_state_dict(ft["model"])  # strict
    assert ft["classes"][0] == "checker" and model.head.out_features == 10
    # the fine-tuned model is itself accepted by the analyses / evals (MAE-style file)
    enc, info = load_encoder(tmp_path / "finetuned.pt")
    assert info["depth"] == 2
    # the target encoder works too, with the recipe's other switches off
    r2 = run_finetune(pretrained, out=tmp_path / "ema", use_ema=True, max_steps=2, batch_size=16, mixup=0, cutmix=0,
                      randaug="none", reprob=0, pool="cls", **FAST)
    assert r2["encoder"]["use_ema"] and r2["recipe"]["pool"] == "cls"


@pytest.mark.slow
def test_finetune_recipe_by_size_and_errors(pretrained, tmp_path):
    assert recipe_for(384) == dict(blr=5e-4, layer_decay=0.75, epochs=300)
    assert recipe_for(768) == dict(blr=2.5e-4, layer_decay=0.65, epochs=100)
    assert recipe_for(1024) == dict(blr=1e-3, layer_decay=0.65, epochs=50)
    with pytest.raises(UserError, match="even batch"):
        run_finetune(pretrained, batch_size=15, **FAST)
    with pytest.raises(UserError, match="randaug"):
        run_finetune(pretrained, randaug="bogus", max_steps=1, batch_size=16, **FAST)
    with pytest.raises(UserError, match="DALI|--train-data"):  # not installed, or: a seeded split is torch-only
        run_finetune(pretrained, data=str(builtin_path() / "val"), backend="dali", max_steps=1, batch_size=16, **FAST)
    with pytest.raises(UserError, match="unknown backend"):
        run_finetune(pretrained, backend="jax", max_steps=1, batch_size=16, **FAST)


def test_batch_randaugment_survives_every_magnitude():
    from lut_fast.evaluation.finetune import BatchRandAugment

    ra = BatchRandAugment("rand-m9-mstd0.5-inc1", 32, threads=1)
    for op in ra.op.ops:  # the largest magnitude of PosterizeIncreasing keeps 0 bits (Pillow >= 11 refuses)
        op.magnitude, op.magnitude_std, op.prob = 10, 0.0, 1.0
    x = torch.randn(4, 3, 32, 32)
    y = ra(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and not torch.equal(x, y)
    ra.close()


# ---------------------------------------------------------------- data splits


def test_split_of_one_folder_is_seeded_stratified_and_disjoint(tmp_path):
    one = builtin_path() / "val"  # a plain class-folder tree (no train/ or val/ inside)
    a, b = resolve_splits(one, 0.25, seed=3), resolve_splits(one, 0.25, seed=3)
    assert a.train == b.train and a.val == b.val and not a.explicit
    assert not set(a.train) & set(a.val) and len(a.train) + len(a.val) == 160
    assert sorted({y for _, y in a.val}) == list(range(10)) and len(a.val) == 40
    assert resolve_splits(one, 0.25, seed=4).val != a.val
    assert resolve_splits(None).explicit and len(resolve_splits(None).val) == 160
    with pytest.raises(UserError, match="not found"):
        resolve_splits(tmp_path / "nope")


# ---------------------------------------------------------------- command line


@pytest.mark.slow
def test_cli_knn_on_an_exported_encoder_and_errors(pretrained, tmp_path):
    from typer.testing import CliRunner

    from lut_fast.evaluation.cli import eval_app

    timm_file = export_timm_encoder(pretrained, tmp_path / "enc.pth")
    runner = CliRunner()
    args = ["--out", str(tmp_path / "k"), "--workers", "0", "--k", "5", "--device", "cpu", "--num-heads", "3"]
    res = runner.invoke(eval_app, ["knn", str(timm_file), *args])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "k" / "knn.json").read_text())["k"] == 5
    res = runner.invoke(eval_app, ["knn", str(timm_file), "--pool", "max"])
    assert isinstance(res.exception, UserError) and "unknown pool 'max'" in str(res.exception)
    for cmd, default in (("knn", "0.07"), ("linear", "90"), ("finetune", "rand-m9-mstd0.5-inc1")):
        res = runner.invoke(eval_app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0 and default in res.output
    r = run_cli("eval", "linear", str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and r.stderr.strip() == f"lut-fast: error: checkpoint not found: {tmp_path / 'missing.pt'}"


# ---------------------------------------------------------------- eval records and the report


@pytest.mark.slow
def test_eval_and_analyze_records_hold_the_protocol_and_report_reads_them(tmp_path):
    import hashlib

    from typer.testing import CliRunner

    from lut_fast.analysis.cli import analyze_app
    from lut_fast.evaluation.cli import eval_app
    from lut_fast.report import collect_rows, to_markdown

    from helpers import tiny_config

    run = tmp_path / "run"
    pretrained = train(tiny_config(run, "run.log_every=1", max_steps=2)).last_checkpoint
    runner = CliRunner()
    res = runner.invoke(eval_app, ["knn", str(pretrained), "--workers", "0", "--device", "cpu", "--k", "7", "--no-cache"])
    assert res.exit_code == 0, res.output
    knn = json.loads((run / "eval" / "knn" / "knn.json").read_text())
    proto = knn["protocol"]
    ckpt = proto["checkpoints"][0]
    assert ckpt["sha256"] == hashlib.sha256(pretrained.read_bytes()).hexdigest()
    assert ckpt["step"] == 2 and ckpt["method"] == "lut" and ckpt["path"] == str(pretrained.absolute())
    listing = sorted(p.relative_to(builtin_path()).as_posix() for p in builtin_path().rglob("*") if p.is_file())
    assert proto["data"]["files"] == len(listing) == 640
    assert proto["data"]["listing_sha256"] == hashlib.sha256("".join(x + "\n" for x in listing).encode()).hexdigest()
    assert proto["settings"]["k"] == 7 and proto["settings"]["temperature"] == 0.07 and proto["command"] == "eval knn"
    assert proto["software"]["lut_fast"] and proto["software"]["torch"] == torch.__version__
    assert proto["created_utc"].endswith("+00:00")

    aad_out = tmp_path / "analysis"
    res = runner.invoke(analyze_app, ["attention-distance", str(pretrained), "--max-images", "16", "--workers", "0",
                                      "--device", "cpu", "--out", str(aad_out)])
    assert res.exit_code == 0, res.output
    aad = json.loads((aad_out / "attention_distance.json").read_text())
    assert aad["protocol"]["checkpoints"][0]["sha256"] == ckpt["sha256"] and aad["protocol"]["settings"]["max_images"] == 16

    rows = collect_rows([run, aad_out / "attention_distance.json"])
    assert len(rows) == 1  # the analysis result joins its run's row through the checkpoint path
    md = to_markdown(rows)
    header, rule, line = md.splitlines()
    assert header.startswith("| run | method | steps | final loss | k-NN top-1 | AAD L1 | AAD L2 |")
    assert f"| {knn['top1']:.2f}% |" in line and line.startswith("| run | lut | 2 |")
    r = run_cli("report", str(run), str(aad_out / "attention_distance.json"))
    assert r.returncode == 0 and "AAD L2" in r.stdout and f"{knn['top1']:.2f}%" in r.stdout
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "neither metrics.jsonl nor eval results" in r.stderr
