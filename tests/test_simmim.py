"""SimMIM and LUT on SimMIM: block masking, the L1 loss, the mask-token encoder, lambda = 0, FLOPs, configs.

Tiny models on the CPU; every test runs in seconds.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lut_fast.config import load_config
from lut_fast.ema import TargetNetwork
from lut_fast.errors import UserError
from lut_fast.flops import ArchDims, flops_per_image, patch_embed_flops, training_flops
from lut_fast.masking import block_mask, make_noise, mask_grid, num_masked_blocks
from lut_fast.models.simmim import LUTSimMIM, SimMIM, build_simmim, pool_unmasked, simmim_pixel_loss
from lut_fast.models.vit import build_encoder

TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.head_hidden_dim=48"]


def tiny_encoder(seed: int = 0, img: int = 32, patch: int = 8):
    torch.manual_seed(seed)
    return build_encoder("vit_tiny", img, patch, depth=2, embed_dim=32, num_heads=2)


# ---------------------------------------------------------------- masking


def test_block_mask_ratio_and_block_structure_at_the_imagenet_recipe():
    """224 px, patch 16, blocks of 32 px: 7 x 7 blocks, 30 masked (ceil 29.4), each covering 2 x 2 patches."""
    per_side, scale = mask_grid(224, 16, 32)
    assert (per_side, scale) == (7, 2)
    masked = num_masked_blocks(per_side**2, 0.6)
    assert masked == 30
    noise = make_noise(8, 49, seed=3, micro_step=5, rank=0, device="cpu")
    for view in (0, 1):
        mask = block_mask(noise, per_side, scale, masked, view)
        assert mask.shape == (8, 196)
        assert (mask.sum(dim=1) == 30 * 4).all()  # 120 of 196 patches, ratio 0.612
        grid = mask.view(8, 7, 2, 7, 2)  # (block row, patch row in block, block col, patch col in block)
        assert (grid == grid[:, :, :1, :, :1]).all(), "a block's patches are masked together"
    visible0 = block_mask(noise, per_side, scale, masked, 0) == 0
    visible1 = block_mask(noise, per_side, scale, masked, 1) == 0
    assert not (visible0 & visible1).any(), "the two LUT views see disjoint blocks"
    # view 0 keeps the lowest-noise blocks visible, as MAE keeps ids[:K]
    lowest = torch.argsort(noise, dim=1)[:, : 49 - masked]
    assert (block_mask(noise, 7, 1, masked, 0).gather(1, lowest) == 0).all()


def test_block_masks_are_reproducible_from_the_seed_and_global_rows_slice_per_rank():
    """(seed, micro-step) fix the masks; a rank's slice of the global draw masks its rows like one process does."""
    def draw(seed: int, step: int) -> torch.Tensor:  # the tasks' draw: rank 0's generator, for the global batch
        return make_noise(8, 16, seed, step, 0, "cpu")

    same = block_mask(draw(1, 7), 4, 1, 10)
    assert torch.equal(same, block_mask(draw(1, 7), 4, 1, 10))
    assert not torch.equal(same, block_mask(draw(1, 8), 4, 1, 10))
    assert not torch.equal(same, block_mask(draw(2, 7), 4, 1, 10))
    world = 4
    rows = 8 // world
    for rank in range(world):
        mine = draw(1, 7)[rank * rows : (rank + 1) * rows]
        assert torch.equal(block_mask(mine, 4, 1, 10), same[rank * rows : (rank + 1) * rows])


def test_mask_grid_refuses_blocks_that_do_not_tile():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        mask_grid(224, 16, 24)
    with pytest.raises(ValueError, match="divide the image size"):
        mask_grid(224, 16, 48)


# ---------------------------------------------------------------- loss


def test_l1_loss_counts_masked_pixels_only_and_averages_over_channels():
    images = torch.zeros(1, 3, 4, 4)
    pred = torch.full((1, 3, 4, 4), 100.0)  # far off everywhere ...
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # ... but only the top 8 pixels count
    pred[:, 0, :2, :], pred[:, 1, :2, :], pred[:, 2, :2, :] = 1.0, -2.0, 3.0
    # sum |pred - x| over masked pixels and channels = 8 * (1 + 2 + 3) = 48; / (8 + 1e-5) / 3
    assert simmim_pixel_loss(images, pred, mask).item() == pytest.approx(48 / (8 + 1e-5) / 3)


def test_reconstruction_maps_each_token_to_its_own_pixels():
    """Head output (3, p, p) per token lands on that patch (SimMIM's 1x1 conv + PixelShuffle layout)."""
    model = SimMIM(tiny_encoder(), mask_patch_size=16, mask_ratio=0.6)
    p, g = 8, 4
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(3.0).repeat_interleave(p * p))  # channel c predicts c
    tokens = torch.randn(2, 1 + g * g, 32)
    pred = model.predict(tokens)
    assert pred.shape == (2, 3, 32, 32)
    assert torch.equal(pred[:, 1], torch.ones(2, 32, 32))
    # all patches masked, images 0: the L1 is the channel mean of |0|, |1|, |2| = 1
    mask = torch.ones(2, g * g)
    assert model.reconstruction(torch.zeros(2, 3, 32, 32), tokens, mask).item() == pytest.approx(1.0, rel=1e-6)
    # patch (row 1, col 2) masked alone: only its pixels count
    images = torch.zeros(2, 3, 32, 32)
    images[:, :, 8:16, 16:24] = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1)  # matches the prediction there
    one = torch.zeros(2, g * g)
    one[:, 1 * g + 2] = 1
    assert model.reconstruction(images, tokens, one).item() == pytest.approx(0.0, abs=1e-6)
    assert model.reconstruction(images, tokens, 1 - one).item() == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------- encoder with mask tokens


def test_masked_patches_are_hidden_from_the_encoder_and_visible_ones_are_not():
    model = SimMIM(tiny_encoder(), mask_patch_size=16, mask_ratio=0.6)
    images = torch.randn(2, 3, 32, 32)
    mask = model.masks(torch.rand(2, model.num_blocks))
    changed = images.clone()
    pixel_mask = mask.view(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3).bool().expand_as(images)
    changed[pixel_mask] = torch.randn(int(pixel_mask.sum()))
    assert torch.equal(model.encode(images, mask), model.encode(changed, mask))
    changed[~pixel_mask] += 1.0
    assert not torch.allclose(model.encode(images, mask), model.encode(changed, mask))
    # no patch masked: exactly the plain encoder (the MAE / LUT path is unchanged)
    assert torch.equal(model.encode(images, torch.zeros(2, 16)), model.encoder(images))
    # the mask token is the model's, so the encoder's state dict is still timm's
    assert "mask_token" in dict(model.named_parameters())
    assert not any("mask_token" in k for k in model.encoder.state_dict())


def test_pool_over_unmasked_tokens_by_hand():
    tokens = torch.tensor([[[9.0], [1.0], [2.0], [30.0], [40.0]]])  # cls, then 4 patches
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert pool_unmasked(tokens, mask).item() == pytest.approx(1.5)


# ---------------------------------------------------------------- LUT on SimMIM


def test_lut_simmim_with_lambda_zero_equals_simmim_in_init_losses_and_gradients():
    simmim = SimMIM(tiny_encoder(seed=4), mask_patch_size=16, mask_ratio=0.6)
    lut = LUTSimMIM(tiny_encoder(seed=4), head_hidden_dim=16, lam=0.0, mask_patch_size=16, mask_ratio=0.6)
    shared = simmim.state_dict()
    assert all(torch.equal(v, lut.state_dict()[k]) for k, v in shared.items()), "same init from the same seed"
    view1, view2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, simmim.num_blocks)
    some_targets = (torch.randn(4, 32), torch.randn(4, 32))  # given, but lambda = 0 must ignore them
    out_s, out_l = simmim(view1, None, noise), lut(view1, view2, noise, some_targets)
    assert torch.equal(out_s["loss"], out_l["loss"]) and "bc_loss" not in out_l
    out_s["loss"].backward()
    out_l["loss"].backward()
    grads_l = {n: p.grad for n, p in lut.named_parameters()}
    for name, p in simmim.named_parameters():
        if p.requires_grad:  # (the sin-cos positions are fixed)
            assert torch.equal(p.grad, grads_l[name]), name
    assert all(grads_l[n] is None for n in grads_l if n.startswith(("projector", "predictor")))


@pytest.mark.parametrize("direction", ["symmetric", "one_way"])
def test_lut_simmim_adds_lambda_times_the_cross_view_bc_term(direction):
    from lut_fast.losses import bc_loss

    model = LUTSimMIM(tiny_encoder(seed=2), head_hidden_dim=16, lam=0.5, direction=direction,
                      mask_patch_size=16, mask_ratio=0.6)
    model.eval()  # fixed BatchNorm statistics, so the hand computation below sees the same heads
    target = TargetNetwork(model)
    view1, view2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, model.num_blocks)
    targets = target.targets(view1, view2, model.symmetric)
    out = model(view1, view2, noise, targets)
    m1, m2 = model.masks(noise, 0), model.masks(noise, 1)
    tokens1, tokens2 = model.encode(view1, m1), model.encode(view2, m2)
    rec = model.reconstruction(view1, tokens1, m1)
    bc = bc_loss(model.online(tokens1, m1), target(view2))
    if direction == "symmetric":
        bc = (bc + bc_loss(model.online(tokens2, m2), target(view1))) / 2
    assert out["simmim_loss"].item() == pytest.approx(rec.item(), rel=1e-5)
    assert out["bc_loss"].item() == pytest.approx(bc.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(rec.item() + 0.5 * bc.item(), rel=1e-5)


def test_symmetric_lut_simmim_refuses_a_ratio_without_two_disjoint_visible_sets():
    with pytest.raises(ValueError, match="disjoint"):
        LUTSimMIM(tiny_encoder(), head_hidden_dim=16, mask_patch_size=8, mask_ratio=0.3)
    LUTSimMIM(tiny_encoder(), head_hidden_dim=16, direction="one_way", mask_patch_size=8, mask_ratio=0.3)


# ---------------------------------------------------------------- FLOPs


def counted_flops_per_image(cfg, batch: int = 2) -> float:
    """FlopCounterMode over the task's losses + backward (its target forward only), on meta tensors, per image."""
    from lut_fast.tasks import build_task

    task = build_task(cfg)
    noise = task.noise(batch, cfg.run.seed, 0)
    task.to(torch.device("meta"))
    views = [torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, device="meta") for _ in range(2)]
    counter = FlopCounterMode(display=False)
    with counter:
        task.losses(task.model, views[0], views[1], noise.to("meta"))["loss"].backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("method,direction,name", [
    ("simmim", "symmetric", "simmim"),
    ("lut_simmim", "symmetric", "lut_simmim_symmetric"),
    ("lut_simmim", "one_way", "lut_simmim_one_way"),
])
def test_analytic_flops_agree_with_flop_counter_mode(method, direction, name):
    cfg = load_config(None, {"method": method, "model.img_size": 64, "model.patch_size": 8, "lut.direction": direction,
                             "lut.lam": 1.0}, TINY)
    analytic = flops_per_image(cfg)
    assert analytic.method == name
    assert (analytic.target_forward > 0) == (method == "lut_simmim")
    # as in tests/test_flops.py: the counter does not charge the patch embedding's input gradient
    student_views = 2 if name == "lut_simmim_symmetric" else 1
    uncharged = student_views * patch_embed_flops(ArchDims.from_config(cfg))
    assert counted_flops_per_image(cfg) == pytest.approx(analytic.total - uncharged, rel=1e-3)


def test_vit_b_simmim_costs_more_than_mae_as_it_encodes_every_patch():
    d = ArchDims()
    simmim = training_flops(d, "simmim").gflops
    assert 100 < simmim < 110  # 106.1 GF: 197 tokens through ViT-B, forward + backward
    assert simmim > training_flops(d, "mae").gflops
    assert training_flops(d, "lut_simmim", "symmetric").gflops > 2 * simmim


# ---------------------------------------------------------------- configs


def test_simmim_methods_get_simmims_recipe_and_the_user_still_wins():
    simmim = load_config(None, {"method": "simmim", "model.name": "vit_base"})
    assert simmim.model.mask_ratio == 0.6 and simmim.model.resolved_mask_patch_size() == 32
    assert (simmim.optim.lr_scaling, simmim.optim.blr, simmim.optim.betas) == ("linear", 5e-5, (0.9, 0.999))
    assert (simmim.optim.warmup_epochs, simmim.optim.clip_grad) == (10, 5.0)
    assert (simmim.aug.recipe, simmim.aug.rrc_scale) == ("mae", (0.67, 1.0))
    assert simmim.source("optim.blr") == "default of method simmim"
    lut = load_config(None, {"method": "lut_simmim", "model.name": "vit_base"})
    assert (lut.model.mask_ratio, lut.optim.blr, lut.optim.betas, lut.aug.recipe) == (0.6, 5e-5, (0.9, 0.999), "lut")
    assert lut.lut.resolved_lam("vit_base") == 0.25
    # 1e-4 per 512 images, as SimMIM's script scales it: 4e-4 at its batch of 2048
    from lut_fast.optim import scaled_lr

    assert scaled_lr(lut.optim.blr, 2048, lut.optim.lr_scaling) == pytest.approx(4e-4)
    mine = load_config(None, {"method": "simmim"}, ["model.mask_ratio=0.5", "optim.betas=[0.9, 0.95]"])
    assert mine.model.mask_ratio == 0.5 and mine.optim.betas == (0.9, 0.95)
    # the small CPU recipe keeps its 2 warm-up epochs of 20
    cpu = load_config(None, {"method": "simmim", "run.device": "cpu"}, [], cpu_recipe=True)
    assert (cpu.optim.warmup_epochs, cpu.model.resolved_mask_patch_size()) == (2, 16)


@pytest.mark.parametrize("method,sets,message", [
    ("simmim", ["model.mask_patch_size=24"], "multiple of the patch size"),
    ("lut_simmim", ["model.mask_ratio=0.3"], "two disjoint visible sets"),
    ("lut_simmim", ["aug.recipe=mae"], "LUT needs two"),
    ("simmim", ["model.mask_ratio=0.99"], "masks all"),
])
def test_config_mistakes_are_one_line_errors(method, sets, message):
    with pytest.raises(UserError, match=message):
        load_config(None, {"method": method}, sets)
    # a MAE or LUT run ignores the block size (its masks are per patch)
    if "mask_patch_size" in sets[0]:
        load_config(None, {"method": "lut"}, sets)


def test_build_simmim_follows_the_config():
    cfg = load_config(None, {"method": "lut_simmim", "model.img_size": 64, "model.patch_size": 8,
                             "lut.direction": "one_way"}, TINY)
    model = build_simmim(cfg)
    assert isinstance(model, LUTSimMIM) and model.direction == "one_way" and model.lam == 1.0
    assert (model.blocks_per_side, model.block_scale, model.num_masked) == (4, 2, 10)
    assert type(build_simmim(dataclasses.replace(cfg, method="simmim"))) is SimMIM


# ---------------------------------------------------------------- training: tasks, backends, resume, DDP


def _losses(out_dir) -> dict[int, dict]:
    import json

    return {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def test_task_noise_is_per_block_from_seed_and_micro_step_only():
    from lut_fast.tasks import LUTSimMIMTask, SimMIMTask, build_task

    from helpers import tiny_config

    for method, cls in (("simmim", SimMIMTask), ("lut_simmim", LUTSimMIMTask)):
        task = build_task(tiny_config("unused", method=method))
        assert type(task) is cls and task.views == (2 if method == "lut_simmim" else 1)
        noise = task.noise(12, seed=3, micro_step=9)
        assert noise.shape == (12, task.model.num_blocks) and noise.device.type == "cpu"
        assert torch.equal(noise, task.noise(12, 3, 9)) and not torch.equal(noise, task.noise(12, 3, 10))
        assert torch.equal(noise[4:8], task.noise(12, 3, 9)[4:8])  # what rank 1 of 3 keeps
    lut_task = build_task(tiny_config("unused", "lut.lam=0", method="lut_simmim"))
    assert lut_task.target is None and lut_task.find_unused_parameters  # lambda = 0: SimMIM, heads unused


@pytest.mark.parametrize("method", ["simmim", "lut_simmim"])
def test_cli_trains_on_the_built_in_data_with_the_torch_backend(tmp_path, method):
    from helpers import TINY_FLAGS, run_cli

    out = tmp_path / method
    proc = run_cli("train", "--method", method, "--device", "cpu", "--max-steps", "2", "--batch-size", "8",
                   "--out", str(out), *TINY_FLAGS, "--set", "data.num_workers=0", "--set", "run.log_every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"default of method {method}: model.mask_ratio=0.6" in proc.stderr
    last = _losses(out)[2]
    assert last["simmim_loss"] > 0 and ("bc_loss" in last) == (method == "lut_simmim")
    from lut_fast.checkpoint import load_file

    ckpt = load_file(out / "checkpoints" / "last.pt")
    assert "mask_token" in ckpt["model"] and (ckpt["target"] is not None) == (method == "lut_simmim")
    # the encoder exports to timm like MAE's and LUT's (the mask token and head stay behind) ...
    import timm

    ema = ["--use-ema"] if method == "lut_simmim" else []
    proc = run_cli("export", "timm", str(out / "checkpoints" / "last.pt"), str(tmp_path / "enc.pth"), *ema)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2)
    vit.load_state_dict(torch.load(tmp_path / "enc.pth", map_location="cpu"), strict=True)
    if method == "simmim":  # ... and has no momentum encoder to export, which is said in one line
        proc = run_cli("export", "timm", str(out / "checkpoints" / "last.pt"), str(tmp_path / "ema.pth"), "--use-ema")
        assert proc.returncode == 2 and "no target (momentum) encoder" in proc.stderr and "Traceback" not in proc.stderr


def test_lut_simmim_with_lambda_zero_trains_exactly_as_simmim(tmp_path):
    """Same seed, same views (LUT's view 1 for both): the same losses and encoder, step by step."""
    from lut_fast.checkpoint import load_file
    from lut_fast.train import train

    from helpers import tiny_config

    runs = {}
    for method, sets in (("simmim", ["aug.recipe=lut"]), ("lut_simmim", ["lut.lam=0"])):
        cfg = tiny_config(tmp_path / method, "run.log_every=1", *sets, method=method, max_steps=3)
        train(cfg)
        runs[method] = (_losses(tmp_path / method), load_file(tmp_path / method / "checkpoints" / "last.pt"))
    (la, ca), (lb, cb) = runs["simmim"], runs["lut_simmim"]
    for step in (1, 2, 3):
        assert la[step]["loss"] == lb[step]["loss"] and "bc_loss" not in lb[step]
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key


def test_resume_reproduces_the_uninterrupted_lut_simmim_losses(tmp_path):
    from lut_fast.train import train

    from helpers import tiny_config

    full = tiny_config(tmp_path / "full", "run.log_every=1", "run.ckpt_every=2", method="lut_simmim", max_steps=6)
    train(full)
    cut = tiny_config(tmp_path / "cut", "run.log_every=1", "run.ckpt_every=2", method="lut_simmim", max_steps=6)

    def crash(step, record):
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cut, on_step=crash)
    assert train(cut, resume=True).steps == 6
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "simmim_loss", "bc_loss"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory):
    """16 built-in images per class, as an FFCV .beton and DALI shards (small, so the conversion takes seconds)."""
    import shutil

    from lut_fast.datasets.builtin import builtin_path
    from lut_fast.datasets.dali_writer import write_shards
    from lut_fast.datasets.ffcv_writer import write_beton

    root = tmp_path_factory.mktemp("small")
    for cls_dir in sorted((builtin_path() / "train").iterdir()):
        (root / "train" / cls_dir.name).mkdir(parents=True)
        for src in sorted(cls_dir.glob("*.jpg"))[:16]:
            shutil.copy(src, root / "train" / cls_dir.name / src.name)
    return {
        "ffcv": write_beton(root, root / "small.beton", workers=1, max_resolution=64).output,
        "dali": write_shards(root, root / "shards", workers=1, shard_size=64, max_resolution=64).output,
    }


# The loaders do not know the method, only the views it asks for (tests/test_backends.py checks both recipes
# on every backend): one method per backend shows both tasks train from the stored formats.
@pytest.mark.parametrize("backend,method", [("ffcv", "simmim"), ("dali", "lut_simmim")])
def test_training_runs_through_ffcv_and_dali(small_stores, tmp_path, backend, method):
    from lut_fast.train import train

    from helpers import tiny_config

    cfg = tiny_config(tmp_path / "run", "run.log_every=1", method=method, data__backend=backend,
                      data__path=str(small_stores[backend]), max_steps=2, optim__batch_size=8)
    result = train(cfg)
    assert result.steps == 2 and result.final_metrics["simmim_loss"] > 0


def test_bench_train_rows_for_simmim_with_flops_and_the_ratio_to_simmim(tmp_path):
    import json

    from test_bench import TINY, invoke

    from lut_fast.flops import flops_per_image

    out = tmp_path / "train.json"
    invoke("train", "--methods", "simmim,lut_simmim_sym,lut_simmim_one_way", "--img-size", "32", "--patch-size", "8",
           *TINY, "--batch-size", "4", "--threads", "1", "--warmup", "1", "--windows", "1", "--steps-per-window", "1",
           "--json", str(out))
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"simmim", "lut_simmim_sym", "lut_simmim_one_way"}
    assert all(r["status"] == "ok" and r["ms_per_step"] > 0 for r in rows.values())
    sets = [s.replace("--set ", "") for s in TINY if s != "--set"]
    for label, (method, direction) in (("simmim", ("simmim", "symmetric")), ("lut_simmim_sym", ("lut_simmim", "symmetric")),
                                       ("lut_simmim_one_way", ("lut_simmim", "one_way"))):
        cfg = load_config(None, {"method": method, "model.img_size": 32, "model.patch_size": 8, "lut.direction": direction}, sets)
        assert rows[label]["gflops_per_image"] == pytest.approx(flops_per_image(cfg).total / 1e9, rel=1e-4)
    assert "lut_simmim_time_ratio" not in rows["simmim"] and "lut_mae_time_ratio" not in rows["lut_simmim_sym"]
    assert rows["lut_simmim_sym"]["lut_simmim_flop_ratio"] > rows["lut_simmim_one_way"]["lut_simmim_flop_ratio"] > 1
    assert rows["lut_simmim_sym"]["lut_simmim_time_ratio"] > 0


def test_two_process_ddp_lut_simmim_equals_one_process_with_the_global_batch(tmp_path):
    """Block noise drawn for the global batch and sliced per rank, SyncBN in the heads: 2 x 4 images == 1 x 8."""
    import subprocess

    from test_distributed import BIN, ENV, TINY as DDP_TINY, assert_same_training_state, metrics, torchrun

    from lut_fast.checkpoint import load_file

    args = ["--method", "lut_simmim", "--accum", "2", "--max-steps", "2", *DDP_TINY]
    single = subprocess.run([str(BIN / "lut-fast"), "train", "--batch-size", "8", "--out", str(tmp_path / "one"), *args],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(torchrun(2, "--batch-size", "4", "--out", str(tmp_path / "two"), *args),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "replicas differed" not in ddp.stderr
    a, b = load_file(tmp_path / "one" / "checkpoints" / "last.pt"), load_file(tmp_path / "two" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 2 and b["world_size"] == 2
    assert_same_training_state(a, b)
    for ra, rb in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for key in ("loss", "simmim_loss", "bc_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key


def test_table_a_recipe_file_loads_and_serves_both_methods():
    from pathlib import Path

    from lut_fast.step import make_schedule

    path = Path(__file__).resolve().parents[1] / "configs" / "lut_simmim_vit_base_in1k.yaml"
    lut = load_config(path)
    simmim = load_config(path, {"method": "simmim"})
    for cfg in (lut, simmim):
        assert (cfg.model.name, cfg.model.resolved_mask_patch_size(), cfg.model.mask_ratio) == ("vit_base", 32, 0.6)
        assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.clip_grad, cfg.optim.betas) == (100, 10, 5.0, (0.9, 0.999))
        sched = make_schedule(cfg, batches_per_epoch=1_281_167 // 2048, world_size=8)
        assert sched.eff_batch == 2048 and sched.peak_lr == pytest.approx(4e-4)
    assert lut.aug.recipe == "lut" and lut.lut.resolved_lam("vit_base") == 0.25
    assert simmim.aug.recipe == "mae" and simmim.aug.rrc_scale == (0.67, 1.0)


def test_simmim_reconstruction_loss_falls_when_fitting_one_batch():
    """Gradients reach the encoder, the mask token and the head: 30 AdamW steps on one batch lower the L1."""
    torch.manual_seed(0)
    model = SimMIM(tiny_encoder(seed=1), mask_patch_size=16, mask_ratio=0.6)
    images = torch.randn(8, 3, 32, 32).cumsum(dim=-1) / 8  # smooth rows: predictable from the visible blocks
    noise = torch.rand(8, model.num_blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(images, None, noise)["loss"]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
        optimizer.step()
    assert loss.item() < 0.7 * first, (first, loss.item())
