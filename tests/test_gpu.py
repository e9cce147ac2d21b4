"""GPU smoke test: three real training steps through ``lut_fast.train.train`` on CUDA.

Runs whenever a CUDA device is present (``pytest -m gpu``; ``docker/gpu_check.sh`` runs it first), and
is skipped with the reason otherwise. Two configurations cover the GPU-only code paths of the step:
bf16 autocast + ``torch.compile`` + channels-last batches, and fp16 autocast with the GradScaler.
"""

from __future__ import annotations

import math

import pytest
import torch

from lut_fast.checkpoint import load_file
from lut_fast.train import train

from helpers import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU smoke test needs one"),
]


@pytest.mark.parametrize(
    "precision, compiled, channels_last",
    [("bf16", True, True), ("fp16", False, False)],
    ids=["bf16-compile-channels_last", "fp16-gradscaler"],
)
def test_three_training_steps_on_cuda(tmp_path, precision, compiled, channels_last):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = tiny_config(
        tmp_path, f"run.precision={precision}", f"run.compile={str(compiled).lower()}",
        f"data.channels_last={str(channels_last).lower()}", "run.log_every=1", "run.ckpt_every=3",
        max_steps=3, run__device="cuda",
    )
    assert (cfg.run.device, cfg.run.precision, cfg.run.compile, cfg.data.channels_last) == (
        "cuda", precision, compiled, channels_last)
    result = train(cfg)
    assert result.steps == 3 and not result.stopped_early
    loss = result.final_metrics["loss"]
    assert math.isfinite(loss) and loss > 0
    ckpt = load_file(result.last_checkpoint)
    scaler = ckpt["scaler"]
    if precision == "fp16":  # loss scaling ran: the scaler holds a finite, positive scale
        assert "scale" in scaler and math.isfinite(float(scaler["scale"])) and float(scaler["scale"]) > 0
    else:  # bf16 needs no loss scaling: the scaler is disabled and saves nothing
        assert not scaler
    weights = [v for v in ckpt["model"].values() if torch.is_floating_point(v)]
    assert all(torch.isfinite(w).all() for w in weights)


def test_device_stage_on_cuda_equals_the_cpu(tmp_path):
    """``finish_batch`` (view 2's photometric ops + normalisation) gives the same views on CUDA as on the CPU.

    The CPU runs of the parity suite cover this code path; here the same batch goes through it on the GPU.
    A solarize threshold can flip a pixel whose float value lands on it differently, so a handful may differ.
    """
    from lut_fast.pipelines import photometric as ph
    from lut_fast.pipelines.batch import RawBatch, finish_batch
    from lut_fast.pipelines.spec import AugSpec

    spec = AugSpec(img_size=64)
    gen = torch.Generator().manual_seed(0)
    n = 64  # enough samples that every op and every jitter order occurs
    view1 = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=gen)
    view2 = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=gen)
    params = ph.sample_params(spec, n, gen)
    raw = RawBatch(view1, view2.contiguous(memory_format=torch.channels_last), torch.arange(n), params)
    on_cpu = finish_batch(raw, spec, "cpu", channels_last=False)
    on_gpu = finish_batch(raw, spec, "cuda", channels_last=True)
    assert on_gpu.view2.is_cuda and on_gpu.view2.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(on_gpu.view1.cpu(), on_cpu.view1, atol=1e-5)  # a fused multiply-add may round differently
    diff = (on_gpu.view2.cpu() - on_cpu.view2).abs()
    assert float(diff.mean()) < 1e-4, float(diff.mean())
    assert float((diff > 1e-3).float().mean()) < 1e-3, float((diff > 1e-3).float().mean())
    assert torch.equal(on_gpu.labels.cpu(), on_cpu.labels)


def test_device_stage_never_waits_for_the_gpu():
    """``finish_batch`` queues its work and returns: no copy or op in it synchronises with the device.

    A synchronising call there waits for the training step already queued, so the trainer could not
    queue the next step while the GPU runs this one (``batch.to_device``: pinned, non-blocking copies).
    """
    from lut_fast.pipelines import photometric as ph
    from lut_fast.pipelines.batch import RawBatch, finish_batch
    from lut_fast.pipelines.spec import AugSpec

    spec = AugSpec(img_size=64)
    g = torch.Generator().manual_seed(1)
    n = 32
    views = torch.randint(0, 256, (2, n, 64, 64, 3), dtype=torch.uint8, generator=g).pin_memory()
    params = ph.sample_params(spec, n, g)
    params[:, ph.JITTER_ON] = 1.0
    params[:, ph.STRONG_OP] = torch.arange(n) % 4 - 1  # none, grayscale, solarize and blur all occur
    raw = RawBatch(views[0].permute(0, 3, 1, 2), views[1].permute(0, 3, 1, 2), torch.arange(n), params)
    finish_batch(raw, spec, "cuda", channels_last=True)  # first call: the constants are made on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            batch = finish_batch(raw, spec, "cuda", channels_last=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert batch.view2.is_cuda and torch.isfinite(batch.view2).all()
