"""End-to-end fine-tuning, the recipe of the paper's Table D (docs/METHOD.md, "13. Evaluation protocols").

Model: timm's ``VisionTransformer`` with the pre-trained encoder loaded
(every encoder key; only the new head is missing), drop path 0.1, a linear
head (trunc-normal std 2e-5, as MAE). ``--pool mean`` (default) classifies
the mean of the patch tokens after the final norm (LUT's pooled feature,
timm ``global_pool='avg', fc_norm=False``); ``--pool cls`` the cls token.

Recipe (defaults by encoder width; every value can be overridden):

=================  ===========  ===========  ===========
                   ViT-Ti / S   ViT-B        ViT-L
=================  ===========  ===========  ===========
base lr            5e-4         2.5e-4       1e-3
layer-wise decay   0.75         0.65         0.65
epochs             300          100          50
=================  ===========  ===========  ===========

AdamW (wd 0.05), lr = blr * sqrt(eff_batch) / 8 (official LUT code; ``--lr-scaling
linear``: blr * eff_batch / 256, MAE; both equal at batch 1024), 5 warm-up
epochs then half-cycle cosine to 1e-6 per step, RandAugment(9, 0.5) from timm
(``rand-m9-mstd0.5-inc1``), label smoothing 0.1, mixup 0.8, cutmix 1.0, random
erasing 0.25 (official code; not in Table D). The online encoder is used
unless ``use_ema``.

Training views come from the pipelines (``build_loader`` with the MAE
recipe's ``AugSpec``: RandomResizedCrop scale 0.08..1 + flip), so any backend
works; RandAugment then runs per image on CPU (PIL, timm's implementation, a
thread pool), mixup/cutmix and random erasing on the device. Validation uses
the deterministic eval transform (resize + center crop 0.875).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from lut_fast.errors import UserError
from lut_fast.evaluation.common import (
    POOLS, autocast, image_loader, normalize, progress, resolve_device, resolve_splits, topk_accuracy, write_json,
)
from lut_fast.evaluation.config import DEFAULT_RANDAUG, FinetuneConfig, ImageSettings, with_overrides
from lut_fast.optim import lr_at
from lut_fast import runtime
from lut_fast.step import apply_update
from lut_fast.pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, AugSpec

# Table D, by encoder width (ViT-Ti is not in the table: it takes ViT-S's values).
RECIPES = {
    192: dict(blr=5e-4, layer_decay=0.75, epochs=300),
    384: dict(blr=5e-4, layer_decay=0.75, epochs=300),
    768: dict(blr=2.5e-4, layer_decay=0.65, epochs=100),
    1024: dict(blr=1e-3, layer_decay=0.65, epochs=50),
}
STATE_FILE = "finetune_state.pt"  # written after every epoch; what --resume continues from


def recipe_for(embed_dim: int) -> dict:
    """Table D's per-size values for an encoder width (the nearest listed width otherwise)."""
    nearest = min(RECIPES, key=lambda d: abs(d - embed_dim))
    return dict(RECIPES[nearest])


def build_classifier(info: dict, num_classes: int, pool: str = "mean", drop_path: float = 0.1) -> nn.Module:
    """timm VisionTransformer of the encoder's architecture with a fresh ``num_classes`` head."""
    from timm.models.vision_transformer import VisionTransformer

    if pool not in POOLS:
        raise UserError(f"unknown pooling {pool!r}; choose {' or '.join(POOLS)}")
    return VisionTransformer(
        img_size=info["img_size"], patch_size=info["patch_size"], embed_dim=info["embed_dim"], depth=info["depth"],
        num_heads=info["num_heads"], mlp_ratio=info["mlp_ratio"], qkv_bias=True, num_classes=num_classes,
        global_pool="avg" if pool == "mean" else "token", fc_norm=False, drop_path_rate=drop_path,
    )


def classifier_from_encoder(encoder: nn.Module, info: dict, num_classes: int, pool: str = "mean", drop_path: float = 0.1, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(info, num_classes, pool, drop_path)
        result = model.load_state_dict(encoder.state_dict(), strict=False)
        if result.unexpected_keys or set(result.missing_keys) - {"head.weight", "head.bias"}:
            raise UserError(f"encoder does not load into timm's ViT: {result}")
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    return model


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for 0 bits: magnitude 10 of 'PosterizeIncreasing' asks for 0 bits, which
    Pillow >= 11 rejects (older Pillow returned a black image, which this does too)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


class BatchRandAugment:
    """timm's RandAugment applied to each image of a normalised batch (CPU, PIL, threads)."""

    def __init__(self, config: str, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, threads: int = 4):
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        if not config.startswith("rand"):
            raise UserError(f"bad --randaug {config!r}: a timm RandAugment string starts with 'rand' (e.g. {DEFAULT_RANDAUG}), or 'none'")
        try:
            self.op = rand_augment_transform(
                config,
                dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                     interpolation=str_to_pil_interp("bicubic")),
            )
        except Exception as e:  # noqa: BLE001 - timm raises assorted errors for a bad config string
            raise UserError(f"bad --randaug {config!r} (timm format, e.g. {DEFAULT_RANDAUG}): {e}") from None
        for op in getattr(self.op, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize_any_bits  # this instance only
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.pool = ThreadPoolExecutor(max(1, threads))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device
        u8 = ((x.float().cpu() * self.std + self.mean) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        arrays = u8.permute(0, 2, 3, 1).contiguous().numpy()
        out = list(self.pool.map(lambda a: np.asarray(self.op(Image.fromarray(a))), arrays))
        y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div_(255.0)
        return ((y - self.mean) / self.std).to(device, non_blocking=True).contiguous(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@torch.no_grad()
def evaluate(model: nn.Module, samples, device: torch.device, batch_size: int = 128, workers: int = 2, crop_pct: float = ImageSettings.crop_pct) -> dict:
    """Top-1/top-5 (percent) and loss on the val images."""
    model.eval()
    img_size = model.patch_embed.img_size[0]
    logits, labels = [], []
    for x, y in image_loader(samples, img_size, batch_size, workers, crop_pct, device):
        with autocast(device):
            logits.append(model(normalize(x, device)).float().cpu())
        labels.append(y)
    logits_t, labels_t = torch.cat(logits), torch.cat(labels)
    return {**topk_accuracy(logits_t, labels_t), "loss": nn.functional.cross_entropy(logits_t, labels_t).item()}


def _train_loader(backend: str, splits, train_data: Optional[str], spec: AugSpec, batch_size: int, device, workers: int, seed: int):
    """The pipelines' loader over the training images (build_loader where the split is on disk)."""
    from lut_fast.pipelines import build_loader, require_backend

    require_backend(backend)
    if train_data is not None or splits.explicit:
        return build_loader(backend, str(train_data or splits.root), spec, batch_size, device=device,
                            num_workers=workers, seed=seed, split="train")
    if backend != "torch":
        raise UserError(
            f"the {backend} backend reads converted data: pass --train-data (converted train split) "
            "or give --data a folder with train/ and val/"
        )
    from lut_fast.pipelines.contract import LoaderOptions
    from lut_fast.pipelines.torch_backend import TorchLoader

    return TorchLoader(splits.train, LoaderOptions(spec, batch_size, device=device, num_workers=workers, seed=seed))


def run_finetune(ckpt: str | Path, cfg: FinetuneConfig | None = None, out: Path | None = None,
                 show_progress: bool = True, resume: bool = False, **overrides) -> dict:
    """Fine-tune; writes finetune.json, finetune_log.jsonl and finetuned.pt into ``out`` (when given).

    With ``out``, the state (model, optimizer, step, history, RNG) is saved to
    ``OUT/finetune_state.pt`` after every epoch; ``resume`` continues from it
    (same data order from the next epoch on) when the recipe is the same.
    ``cfg``: the settings (default ``FinetuneConfig()``); keyword ``overrides`` replace single fields of it.
    """
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay

    from lut_fast.checkpoint import atomic_torch_save, load_encoder

    cfg = with_overrides(FinetuneConfig, cfg, overrides)  # validated: ranges, choices, an even batch for mixup
    (backend, train_data, epochs, max_steps, batch_size, accum, blr, lr, lr_scaling, layer_decay, weight_decay, min_lr,
     warmup_epochs, drop_path, smoothing, mixup, cutmix, randaug, reprob, clip_grad, pool, use_ema, num_heads, workers,
     eval_every, crop_pct, data, val_fraction, seed, device) = (
        cfg.backend, cfg.train_data, cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.accum, cfg.blr, cfg.lr,
        cfg.lr_scaling, cfg.layer_decay, cfg.weight_decay, cfg.min_lr, cfg.warmup_epochs, cfg.drop_path, cfg.smoothing,
        cfg.mixup, cfg.cutmix, cfg.randaug, cfg.reprob, cfg.clip_grad, cfg.pool, cfg.use_ema, cfg.num_heads,
        cfg.workers, cfg.eval_every, cfg.crop_pct, cfg.data, cfg.val_fraction, cfg.seed, cfg.device)
    t0 = time.perf_counter()
    if resume and out is None:
        raise UserError("--resume needs the results folder that holds finetune_state.pt (--out)")
    dev = resolve_device(device)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    encoder, info = load_encoder(ckpt, use_ema=use_ema, num_heads=num_heads)
    recipe = recipe_for(info["embed_dim"])
    epochs = recipe["epochs"] if epochs is None else epochs
    blr = recipe["blr"] if blr is None else blr
    layer_decay = recipe["layer_decay"] if layer_decay is None else layer_decay
    if epochs <= 0:
        raise UserError(f"epochs must be positive, got {epochs}")
    splits = resolve_splits(data, val_fraction, seed)
    num_classes = len(splits.classes)
    model = classifier_from_encoder(encoder, info, num_classes, pool, drop_path, seed).to(dev)

    spec = AugSpec(recipe="mae", img_size=info["img_size"], rrc_scale=(0.08, 1.0))
    loader = _train_loader(backend, splits, train_data, spec, batch_size, dev, workers, seed)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise UserError(f"one epoch has {len(loader)} batches, fewer than --accum {accum}")
    total = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    warmup = round(total * warmup_epochs / epochs) if max_steps else round(warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total - 1) if total > 1 else 0
    eff_batch = batch_size * accum
    peak = lr if lr is not None else (blr * math.sqrt(eff_batch) / 8 if lr_scaling == "sqrt" else blr * eff_batch / 256)

    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=peak, fused=dev.type == "cuda" or None)
    mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes) if (mixup > 0 or cutmix > 0) else None
    if mixup_fn is not None:
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    rand_aug = BatchRandAugment(randaug, info["img_size"], threads=max(1, workers)) if randaug and randaug != "none" else None
    erasing = RandomErasing(reprob, mode="pixel", max_count=1, device=str(dev)) if reprob > 0 else None

    recipe_record = {
        "backend": backend, "batch_size": batch_size, "accum": accum, "eff_batch": eff_batch, "blr": blr, "lr": peak,
        "lr_scaling": lr_scaling, "layer_decay": layer_decay, "weight_decay": weight_decay, "min_lr": min_lr,
        "warmup_steps": warmup, "total_steps": total, "drop_path": drop_path, "smoothing": smoothing, "mixup": mixup,
        "cutmix": cutmix, "randaug": randaug, "reprob": reprob, "pool": pool, "clip_grad": clip_grad,
    }
    log_path = Path(out) / "finetune_log.jsonl" if out is not None else None
    state_path = Path(out) / STATE_FILE if out is not None else None
    history: list[dict] = []
    step, epoch, running = 0, 0, []
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        changed = [k for k in recipe_record if state["recipe"].get(k) != recipe_record[k]]
        if changed or state["checkpoint"] != str(ckpt):
            what = changed[0] if changed else "checkpoint"
            was, now = (state["recipe"].get(what), recipe_record[what]) if changed else (state["checkpoint"], str(ckpt))
            raise UserError(f"cannot resume the fine-tuning in {out}: {what} was {was!r}, now {now!r}; "
                            "use the same options, or another --out for a new fine-tuning")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, history = state["step"], state["epoch"], state["history"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        print(f"lut-fast: resuming the fine-tuning at step {step} (epoch {epoch}) from {state_path}", file=sys.stderr)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))  # fresh, or the resumed run's epochs
    # The pre-training step's machinery (lut_fast/step.py): accumulation, the GradScaler (active only
    # under fp16; fine-tuning autocasts as evaluation does: bf16 where the GPU has it, else fp32), and
    # one host sync per optimizer step, not per micro-batch.
    amp_dtype = runtime.inference_precision(dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    micro_losses: list[torch.Tensor] = []
    with progress(show_progress) as bar, contextlib.ExitStack() as stack:
        if rand_aug is not None:
            stack.callback(rand_aug.close)
        task = bar.add_task("fine-tune", total=total, completed=step, info="") if bar is not None else None
        while step < total:
            model.train()
            loader.set_epoch(epoch)
            for batch in loader:
                x, y = batch.view1, batch.labels.to(dev)
                if rand_aug is not None:
                    x = rand_aug(x)
                x = x.contiguous()
                if erasing is not None:
                    x = erasing(x)
                if mixup_fn is not None:
                    x, y = mixup_fn(x, y)
                with runtime.autocast(dev, amp_dtype):
                    loss = criterion(model(x), y)
                scaler.scale(loss / accum).backward()
                micro_losses.append(loss.detach().float())
                if len(micro_losses) < accum:
                    continue
                step_losses = torch.stack(micro_losses).tolist()  # the step's one host sync
                micro_losses.clear()
                bad = next((v for v in step_losses if not math.isfinite(v)), None)
                if bad is not None:
                    raise UserError(f"fine-tuning loss became {bad} at step {step}: lower the lr")
                running += step_losses
                lr_now = lr_at(step, total, warmup, peak, min_lr)
                apply_update(optimizer, scaler, lr_now, clip_grad, model.parameters(), step + 1)
                step += 1
                if bar is not None:
                    bar.update(task, completed=step, info=f"epoch {epoch + 1} loss {np.mean(running[-20:]):.3f} lr {lr_now:.2e}")
                if step >= total:
                    break
            epoch += 1
            if step >= total or epoch % eval_every == 0:
                metrics = evaluate(model, splits.val, dev, 128, workers, crop_pct)
                record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(running)) if running else None,
                          **{f"val_{k}": v for k, v in metrics.items()}}
                running = []
                history.append(record)
                if log_path is not None:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if state_path is not None:  # after every epoch: what --resume continues from
                atomic_torch_save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                    "history": history, "recipe": recipe_record, "checkpoint": str(ckpt),
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                }, state_path)

    final = history[-1]
    result = {
        "command": "finetune",
        "top1": final["val_top1"],
        **({"top5": final["val_top5"]} if "val_top5" in final else {}),
        "best_top1": max(h["val_top1"] for h in history),
        "steps": step,
        "epochs": round(step * accum * batch_size / max(1, len(splits.train)), 3),
        "recipe": recipe_record,
        "encoder": info,
        "data": splits.describe(),
        "history": history,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        out = Path(out)
        arch = {k: info[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
        atomic_torch_save(
            {
                "finetuned": "lut-fast/1",  # not "format": that key marks pre-training checkpoints
                "model": model.state_dict(),  # timm VisionTransformer keys, head included
                "timm_kwargs": {**arch, "num_classes": num_classes, "global_pool": "avg" if pool == "mean" else "token", "fc_norm": False},
                "classes": splits.classes,
                "metrics": {k: result[k] for k in ("top1", "top5", "best_top1") if k in result},
                "source": info,
            },
            out / "finetuned.pt",
        )
        result["model_path"] = str(out / "finetuned.pt")
        write_json(result, out / "finetune.json")
    return result
