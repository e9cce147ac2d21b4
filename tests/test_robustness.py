"""`lut-fast eval robustness`: occlusion, corruptions, class mapping of shift sets, mCE, the command end to end (CPU).

The classifiers are made here with the real code: a tiny timm encoder (32 px, patch 8, one block) saved as
a timm state dict, fine-tuned for two steps with `run_finetune` (-> finetuned.pt) and linearly probed for
one epoch with `run_linear` (-> linear_head.pt) on the built-in data.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lut_fast.datasets.builtin import CLASSES, builtin_path
from lut_fast.errors import UserError
from lut_fast.evaluation.robustness import (
    ALEXNET_IMAGENET_C, CORRUPTION_GROUPS, ConditionImages, RobustnessConfig, Scorer, corrupt_image,
    corruption_errors, image_seed, load_classifier, load_reference_errors, map_classes, occlude_center,
    occlusion_box, resolve_corruptions, run_robustness, scan_set,
)

from helpers import run_cli

pytest.importorskip("imagecorruptions", reason="the robustness extra (installed by the test extra)")
FAST = dict(workers=0, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """(finetuned.pt, linear_head.pt) of one tiny encoder, made by `eval finetune` and `eval linear`'s code."""
    from timm.models.vision_transformer import VisionTransformer

    from lut_fast.evaluation.finetune import run_finetune
    from lut_fast.evaluation.linear import run_linear

    root = tmp_path_factory.mktemp("classifiers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, num_classes=0)
    torch.save(encoder.state_dict(), root / "encoder.pt")
    run_finetune(root / "encoder.pt", out=root / "eval" / "finetune", max_steps=2, batch_size=16, num_heads=2,
                 mixup=0, cutmix=0, randaug="none", reprob=0, **FAST)
    run_linear(root / "encoder.pt", out=root / "eval" / "linear", epochs=1, num_heads=2, cache=False, **FAST)
    return root / "eval" / "finetune" / "finetuned.pt", root / "eval" / "linear" / "linear_head.pt"


# ---------------------------------------------------------------- occlusion


def test_occlusion_fills_exactly_the_requested_centre_square():
    images = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    for fraction, start, side in ((0.25, 8, 16), ((8 * 8) / (32 * 32), 12, 8), (0.5, 4, 23)):  # an odd side: one pixel more below and right
        assert occlusion_box(32, fraction) == (start, side)
        out = occlude_center(images, fraction)
        zero = out == 0
        assert int(zero.sum()) == 2 * 3 * side * side  # exactly the square, every channel, every image
        assert zero[..., start:start + side, start:start + side].all()
        assert abs(side * side / 32**2 - fraction) < 0.02
    assert torch.equal(images, torch.full((2, 3, 32, 32), 200, dtype=torch.uint8))  # the input is left alone
    assert torch.equal(occlude_center(images, 0.0), images)
    mean = occlude_center(images, 0.25, fill="mean")
    assert mean[0, :, 16, 16].tolist() == [124, 116, 104]  # the ImageNet mean in uint8: 0 after normalising
    assert int((mean != 200).sum()) == 2 * 3 * 16 * 16


# ---------------------------------------------------------------- corruptions


def test_corruption_selection_by_names_and_groups():
    assert resolve_corruptions(["common"]) == list(CORRUPTION_GROUPS["common"]) and len(CORRUPTION_GROUPS["common"]) == 15
    assert resolve_corruptions(["contrast,noise", "gaussian_noise"]) == ["gaussian_noise", "shot_noise", "impulse_noise", "contrast"]
    assert resolve_corruptions(["none"]) == [] and resolve_corruptions([]) == []
    with pytest.raises(UserError, match="unknown corruption 'rain'"):
        resolve_corruptions(["rain"])
    with pytest.raises(UserError, match="severities"):
        RobustnessConfig(severities="0,6").validate()


def test_every_corruption_is_deterministic_per_image_and_changes_pixels():
    from lut_fast.evaluation.common import center_crop, load_rgb

    path = sorted((builtin_path() / "val" / "star").iterdir())[0]
    image = np.asarray(center_crop(load_rgb(str(path)), 48))
    before = np.random.get_state()[1].copy()
    for name in CORRUPTION_GROUPS["all"]:
        a = corrupt_image(image, name, 3, seed=11)
        assert a.shape == image.shape and a.dtype == np.uint8, name
        assert np.array_equal(a, corrupt_image(image, name, 3, seed=11)), f"{name} is not reproducible"
        assert not np.array_equal(a, image), f"{name} left the image as it was"
        assert not np.array_equal(a, corrupt_image(image, name, 5, seed=11)), f"{name}: severity 5 = severity 3"
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global generator is put back
    noisy = [corrupt_image(image, "gaussian_noise", 3, seed=s) for s in (1, 2)]
    assert not np.array_equal(*noisy)  # the seed is what varies the noise
    # The seed of an image: its path inside the set, the corruption and the severity, not the loading order.
    assert image_seed(0, "star/a.jpg", "snow", 2) == image_seed(0, "star/a.jpg", "snow", 2)
    assert len({image_seed(0, "star/a.jpg", "snow", 2), image_seed(0, "star/b.jpg", "snow", 2),
                image_seed(0, "star/a.jpg", "snow", 3), image_seed(1, "star/a.jpg", "snow", 2)}) == 4
    val = scan_set("val", None, 20)
    ds = ConditionImages(val.samples, val.root, 32, 0.875, "shot_noise", 2, seed=0)
    first = [ds[i][0] for i in (3, 1)]
    assert torch.equal(first[0], ds[3][0]) and torch.equal(first[1], ds[1][0])  # any order, same pixels


@pytest.mark.timeout(180)
def test_loader_processes_corrupt_after_the_parent_probed_at_full_size():
    """The probe runs every corruption in the parent at the classifier's size (224 px starts OpenCV's thread
    pool); forked loader processes must still corrupt (a thread setting in them once waited forever)."""
    from lut_fast.evaluation.robustness import _loader, probe_corruptions

    usable, skipped = probe_corruptions(list(CORRUPTION_GROUPS["all"]), 224)
    assert usable == list(CORRUPTION_GROUPS["all"]) and skipped == {}
    val = scan_set("val", None, 4)
    for name in ("defocus_blur", "zoom_blur", "frost"):  # OpenCV and scipy filters
        ds = ConditionImages(val.samples, val.root, 224, 0.875, name, 2, seed=0)
        batches = list(_loader(ds, 2, 2, torch.device("cpu")))
        assert torch.equal(torch.cat([x for x, _ in batches]), torch.stack([ds[i][0] for i in range(len(ds))]))


# ---------------------------------------------------------------- class mapping


def test_class_mapping_by_names_indices_file_and_the_error_for_unmappable_folders(tmp_path):
    classes = ["n01", "n02", "n03", "n04", "n05"]
    r_style = map_classes("imagenet-r", ["n02", "n05"], classes)  # -R / -A: a WordNet-id subset
    assert r_style.targets == [[1], [4]] and r_style.allowed == [1, 4] and r_style.how == "names"
    assert r_style.describe(len(classes))["restricted_to_classes"] == 2
    # ImageNet-V2: folders named by class index, listed in string order ("10" before "2"): mapped by value.
    twelve = [f"n{i:02d}" for i in range(12)]
    v2 = map_classes("imagenet-v2", sorted(str(i) for i in range(12)), twelve)
    assert v2.how == "indices" and v2.targets[:4] == [[0], [1], [10], [11]] and v2.targets[4] == [2]
    assert v2.allowed == list(range(12)) and v2.describe(12)["restricted_to_classes"] is None
    (tmp_path / "map.yaml").write_text("chair: n03\nmug: [n01, 4]\nkite: []\n")
    from lut_fast.evaluation.robustness import load_class_map

    objectnet = map_classes("objectnet", ["chair", "kite", "mug", "zebra"], classes, load_class_map(tmp_path / "map.yaml"))
    assert objectnet.targets == [[2], [], [0, 4], []] and objectnet.skipped_folders == ["kite", "zebra"]
    assert objectnet.allowed == [0, 2, 4] and objectnet.how == "mapping file"
    with pytest.raises(UserError, match=r"sketchy: 1 of its 2 class folders are not classes .*--class-map sketchy=FILE"):
        map_classes("sketchy", ["n01", "dog"], classes)
    with pytest.raises(UserError, match="not a class of the classifier"):
        map_classes("objectnet", ["chair"], classes, {"chair": ["n99"]})
    with pytest.raises(UserError, match="none of its 1 class folders is in the mapping"):
        map_classes("objectnet", ["zebra"], classes, {"chair": ["n01"]})

    # Restricted logits: the best allowed class wins, right when it is in the image's targets.
    scorer = Scorer(objectnet, len(classes), torch.device("cpu"))
    logits = torch.tensor([[0.0, 9.0, 5.0, 0.0, 1.0],    # n02 is not allowed -> n03 (2): chair is right
                           [3.0, 0.0, 1.0, 9.0, 2.0],    # n04 not allowed -> n01 (0): mug is right
                           [0.0, 0.0, 1.0, 0.0, 2.0]])   # -> 4: chair is wrong
    scorer.add(logits, torch.tensor([0, 2, 0]))
    assert scorer.correct == 2 and scorer.seen == 3


# ---------------------------------------------------------------- mCE


def test_mce_arithmetic_by_hand(tmp_path):
    (tmp_path / "ref.yaml").write_text(
        "name: ref\nunit: percent\nclean: 20\nerrors:\n  gaussian_noise: [20, 40, 60, 80, 100]\n  contrast: 50\n")
    ref = load_reference_errors(str(tmp_path / "ref.yaml"))
    top1 = {"gaussian_noise": {1: 90, 2: 80, 3: 70, 4: 60, 5: 50},  # errors 10..50: sum 150 vs 300 -> CE 50
            "contrast": {1: 80, 2: 80, 3: 70, 4: 70, 5: 50},      # errors mean 30 vs 50 -> CE 60
            "fog": {1: 50, 2: 50, 3: 50, 4: 50, 5: 50}}           # no reference: left out
    r = corruption_errors(top1, clean_top1=95.0, reference=ref)
    assert r["ce"] == pytest.approx({"gaussian_noise": 50.0, "contrast": 60.0}) and r["mce"] == pytest.approx(55.0)
    assert r["skipped"] == {"fog": "no reference error"}
    # relative: (150 - 5*5) / (300 - 5*20) = 62.5; (150 - 25) / (250 - 100) = 83.33
    assert r["relative_ce"] == pytest.approx({"gaussian_noise": 62.5, "contrast": 250 / 3})
    # A subset of severities: per-severity references still normalise, a mean over 1-5 cannot.
    part = corruption_errors({"gaussian_noise": {2: 80, 3: 70}, "contrast": {2: 80}}, None, ref)
    assert part["ce"] == pytest.approx({"gaussian_noise": 50 / 100 * 100}) and "severities 2" in part["skipped"]["contrast"]
    alexnet = load_reference_errors("alexnet")
    assert alexnet["errors"]["gaussian_noise"] == pytest.approx(88.6428) and len(alexnet["errors"]) == 15
    assert set(ALEXNET_IMAGENET_C) == set(CORRUPTION_GROUPS["common"])
    (tmp_path / "bad.yaml").write_text("unit: fraction\nerrors:\n  gaussian_noise: 88\n")
    with pytest.raises(UserError, match=r"error rate in \(0, 1\]"):
        load_reference_errors(str(tmp_path / "bad.yaml"))


# ---------------------------------------------------------------- classifiers and the command


def test_classifiers_load_from_finetune_and_linear_outputs_and_a_pretraining_file_is_refused(classifiers, tmp_path):
    finetuned, linear = classifiers
    for path, kind in ((finetuned, "finetuned"), (linear, "linear")):
        clf = load_classifier(path)
        assert clf.classes == list(CLASSES) and clf.img_size == 32 and clf.patch_size == 8 and clf.info["kind"] == kind
        assert clf.info["source_checkpoint"].endswith("encoder.pt")
        assert clf.model(torch.zeros(2, 3, 32, 32)).shape == (2, len(CLASSES))
    torch.save({"format": "lut-fast/1", "model": {}}, tmp_path / "last.pt")
    with pytest.raises(UserError, match=r"pre-training checkpoint, without a classifier: run `lut-fast eval finetune"):
        load_classifier(tmp_path / "last.pt")
    with pytest.raises(UserError, match="holds no classifier"):
        load_classifier(finetuned.parents[2] / "encoder.pt")


def test_same_results_whatever_the_batch_size_and_worker_count(classifiers, tmp_path):
    cfg = dict(corruptions=["gaussian_noise"], severities="2", max_images=24, occlusion=0.25)
    a = run_robustness([classifiers[0]], RobustnessConfig(batch_size=5, workers=0, **cfg), show_progress=False)
    b = run_robustness([classifiers[0]], RobustnessConfig(batch_size=16, workers=2, **cfg), show_progress=False)
    assert a["results"][0]["corruptions"] == b["results"][0]["corruptions"]
    assert a["results"][0]["clean_top1"] == b["results"][0]["clean_top1"]
    assert a["data"]["val"]["images"] == 24 and a["occlusion"]["side_px"] == 16


def test_cli_writes_table_json_and_plot_for_two_classifiers_with_a_shift_set(classifiers, tmp_path):
    finetuned, linear = classifiers
    fake_r = tmp_path / "imagenet-r-style"  # a subset of the classes, by folder name (as -R / -A by WordNet id)
    for name in ("circle", "star", "waves"):
        shutil.copytree(builtin_path() / "val" / name, fake_r / name)
    out = tmp_path / "robustness"
    proc = run_cli("eval", "robustness", str(finetuned), str(linear), "--out", str(out), "--corruptions", "gaussian_noise,contrast",
                   "--severities", "1,2,3,4,5", "--reference-errors", "alexnet", "--shift", f"r-style={fake_r}",
                   "--max-images", "40", "--workers", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "center occluded (8x8 px, 6.2%)" in proc.stdout and "mCE vs AlexNet" in proc.stdout
    result = json.loads((out / "robustness.json").read_text())
    assert (out / "robustness.png").stat().st_size > 10_000 and result["plot"] == str(out / "robustness.png")
    assert [c["kind"] for c in result["classifiers"]] == ["finetuned", "linear"]
    for r in result["results"]:
        assert set(r["corruptions"]) == {"gaussian_noise", "contrast"} and set(r["corruptions"]["contrast"]) == {"1", "2", "3", "4", "5"}
        assert r["corruption_mean_top1"] == pytest.approx(np.mean([np.mean(list(v.values())) for v in r["corruptions"].values()]))
        assert set(r["mce"]["ce"]) == {"gaussian_noise", "contrast"} and r["mce"]["mce"] > 0
        assert 0 <= r["occluded_top1"] <= 100 and r["occlusion_drop"] == pytest.approx(r["clean_top1"] - r["occluded_top1"])
        shift = r["shift"]["r-style"]
        assert shift["images"] == 40 and shift["mapped_by"] == "names" and shift["restricted_to_classes"] == 3
        assert shift["top1"] * 40 / 100 == pytest.approx(round(shift["top1"] * 40 / 100))  # a count out of 40
    assert result["data"]["val"] == {**result["data"]["val"], "images": 40, "images_in_folder": 160, "class_folders": 10}
    assert result["occlusion"] == {**result["occlusion"], "side_px": 8, "box": [12, 12, 20, 20], "default_one_patch": True}
    protocol = result["protocol"]
    assert protocol["command"] == "eval robustness" and "shift_r-style" in protocol
    assert [c["path"] for c in protocol["checkpoints"]][:2] == [str(finetuned), str(linear)]
    from lut_fast.report import collect_rows, to_markdown

    rows = collect_rows([out / "robustness.json"])  # `lut-fast report`: a row per classifier (both from one encoder)
    root = finetuned.parents[2].name  # labels: "<run> (<eval command>)"
    assert [r.label for r in rows] == [f"{root} (finetune)", f"{root} (linear)"]
    assert [c["label"] for c in result["classifiers"]] == [f"{root} (finetune)", f"{root} (linear)"]
    assert rows[0].values["occluded"] == result["results"][0]["occluded_top1"]
    assert rows[1].values["mce"] == result["results"][1]["mce"]["mce"]
    assert "| center-occluded top-1 | corruption mean top-1 | mCE |" in to_markdown(rows)

    bad = tmp_path / "bad"
    shutil.copytree(builtin_path() / "val" / "star", bad / "not-a-class")
    proc = run_cli("eval", "robustness", str(finetuned), "--corruptions", "none", "--shift", f"odd={bad}", "--workers", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "lut-fast: error: odd: 1 of its 1 class folders are not classes of the classifier (not-a-class; the classifier's "
        "are e.g. checker, circle, cross) nor class indices; give a mapping file: --class-map odd=FILE"]


def test_a_runs_finetuned_classifier_lands_in_the_runs_eval_folder_and_report_row(tmp_path):
    """pre-train -> eval finetune -> eval robustness (default --out) -> lut-fast report on the run folder."""
    from typer.testing import CliRunner

    from lut_fast.evaluation.cli import eval_app
    from lut_fast.evaluation.finetune import run_finetune
    from lut_fast.report import collect_rows, to_markdown
    from lut_fast.train import train

    from helpers import tiny_config

    run = tmp_path / "run"
    pretrained = train(tiny_config(run, max_steps=2)).last_checkpoint
    run_finetune(pretrained, out=run / "eval" / "finetune", max_steps=1, batch_size=16, mixup=0, cutmix=0,
                 randaug="none", reprob=0, **FAST)
    res = CliRunner().invoke(eval_app, ["robustness", str(run / "eval" / "finetune" / "finetuned.pt"), "--corruptions",
                                        "pixelate", "--severities", "2", "--max-images", "20", "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    result = json.loads((run / "eval" / "robustness" / "robustness.json").read_text())
    assert result["classifiers"][0]["source_checkpoint"] == str(pretrained) and result["classifiers"][0]["method"] == "lut"
    assert result["protocol"]["settings"]["corruptions"] == ["pixelate"] and result["protocol"]["data"]["source"] == "built-in"
    rows = collect_rows([run])
    assert len(rows) == 1 and rows[0].label == "run"  # joined to the run through the pre-training checkpoint
    assert rows[0].values["occluded"] == result["results"][0]["occluded_top1"]
    assert rows[0].values["corrupted"] == result["results"][0]["corruption_mean_top1"] == result["results"][0]["corruptions"]["pixelate"]["2"]
    assert "| center-occluded top-1 | corruption mean top-1 |" in to_markdown(rows).splitlines()[0]
