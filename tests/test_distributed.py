"""Data parallelism on CPU (gloo): sharding, synchronised BatchNorm, and DDP == one process.

The end-to-end test runs ``torchrun --nproc-per-node 2`` on the tiny model
(per-rank batch 4, accumulation 2) and one process with batch 8 (same
accumulation, same seed), and compares losses, optimizer moments and the
parameters of student and target after a few optimizer steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lut_fast.checkpoint import load_file
from lut_fast.distributed import GlooSyncBatchNorm, convert_sync_batchnorm, fingerprint
from lut_fast.pipelines.torch_backend import EpochSampler

BIN = Path(sys.executable).parent
TINY = [
    "--img-size", "32", "--patch-size", "8", "--device", "cpu", "--precision", "fp32",
    "--set", "model.depth=2", "--set", "model.decoder_depth=1", "--set", "model.decoder_embed_dim=64",
    "--set", "model.decoder_num_heads=4", "--set", "model.head_hidden_dim=128",
    "--set", "data.num_workers=0", "--set", "run.progress=false", "--set", "run.log_every=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", "-m", "lut_fast.cli", "train", *args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("n,batch,world", [(100, 8, 2), (97, 4, 3), (64, 16, 4), (50, 5, 1)])
def test_rank_shards_are_disjoint_cover_the_epoch_and_form_the_single_process_batches(n, batch, world):
    single = EpochSampler(n, batch * world, seed=3)
    shards = [EpochSampler(n, batch, seed=3, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        idx = [s.indices(epoch) for s in shards]
        assert all(len(i) == len(idx[0]) == shards[0].batches_per_epoch * batch for i in idx)
        flat = [i for shard in idx for i in shard]
        assert len(set(flat)) == len(flat), "shards overlap"
        # together they cover the epoch: every sample except the n mod (batch * world) left over
        assert len(flat) == n - n % (batch * world)
        assert set(flat) == set(single.indices(epoch))
        # global batch b of the ranks == batch b of one process with the global batch size
        whole = single.indices(epoch)
        for b in range(shards[0].batches_per_epoch):
            together = [i for shard in idx for i in shard[b * batch : (b + 1) * batch]]
            assert together == whole[b * batch * world : (b + 1) * batch * world]
    # the permutation changes with the epoch, and resuming mid-epoch skips whole batches
    assert shards[0].indices(0) != shards[0].indices(1)
    s = shards[-1]
    start = s.batches_per_epoch // 2
    s.set_epoch(1, start_batch=start)
    assert [i for _, i in s] == s.indices(1)[start * batch :]
    assert len(s) == (s.batches_per_epoch - start) * batch


def test_single_process_sampler_takes_consecutive_slices_of_the_permutation():
    s = EpochSampler(40, 8, seed=0)
    g = torch.Generator().manual_seed(0 * 100_003 + 5)
    assert s.indices(5) == torch.randperm(40, generator=g).tolist()


# ---------------------------------------------------------------- synchronised BatchNorm (2 gloo processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_worker(rank: int, world: int, port: int, x: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(x.shape[1])), "cpu")
        assert isinstance(bn[0], GlooSyncBatchNorm)
        with torch.no_grad():
            bn[0].weight.uniform_(0.5, 1.5)
            bn[0].bias.uniform_(-0.5, 0.5)
        chunk = x.chunk(world)[rank].clone().requires_grad_(True)
        y = bn(chunk)
        # a per-sample loss, averaged over the global batch as DDP does (local mean, then / world)
        loss = (y * torch.arange(1, y.shape[1] + 1)).pow(2).mean() / world
        loss.backward()
        torch.save(
            {"y": y.detach(), "dx": chunk.grad, "dw": bn[0].weight.grad, "db": bn[0].bias.grad,
             "rm": bn[0].running_mean, "rv": bn[0].running_var},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gloo_sync_batchnorm_equals_batchnorm_over_the_global_batch(tmp_path):
    world, x = 2, torch.randn(12, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    # fork: the children need not import this test module (pytest's importlib mode)
    mp.start_processes(_sync_bn_worker, args=(world, _free_port(), x, str(tmp_path)), nprocs=world, start_method="fork")
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    (y * torch.arange(1, 6)).pow(2).mean().backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), xr.grad)
    # parameter gradients: DDP averages the ranks' gradients, each of which is the local share
    torch.testing.assert_close(sum(r["dw"] for r in ranks), ref.weight.grad)
    torch.testing.assert_close(sum(r["db"] for r in ranks), ref.bias.grad)
    for r in ranks:
        torch.testing.assert_close(r["rm"], ref.running_mean)
        torch.testing.assert_close(r["rv"], ref.running_var)


def test_sync_batchnorm_conversion_keeps_state_dict_names_and_values():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    model(torch.randn(6, 4))  # running statistics away from their defaults
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, "cpu")
    after = converted.state_dict()
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k])
    # outside a process group it is plain BatchNorm
    x = torch.randn(6, 4)
    converted.eval()
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU()).eval()
    plain.load_state_dict(before)
    torch.testing.assert_close(converted(x), plain(x))


def test_fingerprint_sees_any_change_of_bits():
    a = [torch.randn(10, 3), torch.arange(7), torch.randn(5).to(torch.bfloat16)]
    same = [t.clone() for t in a]
    assert fingerprint(a) == fingerprint(same)
    changed = [t.clone() for t in a]
    changed[0][3, 1] = torch.nextafter(changed[0][3, 1], torch.tensor(1e9))
    assert fingerprint(a) != fingerprint(changed)
    swapped = [a[0].flip(0), a[1], a[2]]
    assert fingerprint(a) != fingerprint(swapped)


# ---------------------------------------------------------------- DDP == one process


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """One process, batch 8, accumulation 2: the reference for the 2-process run."""
    out = tmp_path_factory.mktemp("single") / "run"
    cmd = [str(BIN / "lut-fast"), "train", "--batch-size", "8", "--accum", "2", "--max-steps", "3", "--out", str(out), *TINY]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}.{i}")
    elif isinstance(tree, torch.Tensor):
        yield prefix, tree


def assert_same_training_state(a: dict, b: dict) -> None:
    """Student, target and optimizer of two checkpoints agree within float tolerance.

    All-reduce sums in another order than one batched process, and Adam divides
    by sqrt(v): where a gradient is only rounding noise (e.g. the key biases,
    whose true gradient is 0) such differences grow to a fraction of one lr
    step. So: the optimizer's moments (linear / quadratic in the gradients)
    match tightly, and parameters match within a small fraction of lr.
    """
    lr = a["schedule"]["peak_lr"]
    for part in ("model", "target"):
        fa, fb = dict(_flat(a[part])), dict(_flat(b[part]))
        assert fa.keys() == fb.keys()
        off = total = 0
        for k in fa:
            torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=0.5 * lr, msg=f"{part}{k}")
            if fa[k].is_floating_point():
                off += int(((fa[k] - fb[k]).abs() > 1e-6).sum())
                total += fa[k].numel()
        assert off <= 1e-3 * total, f"{part}: {off} of {total} values differ by more than 1e-6"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = sa[i][key], sb[i][key]
            scale = x.abs().max().clamp_min(1e-30)
            assert ((x - y).abs().max() / scale) < 1e-4, (i, key)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_equals_one_process_with_the_global_batch(single_run, tmp_path):
    out = tmp_path / "ddp"
    cmd = torchrun(2, "--batch-size", "4", "--accum", "2", "--max-steps", "3", "--out", str(out), *TINY)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr and "effective batch 16" in proc.stderr
    assert "replicas differed" not in proc.stderr  # ranks stayed bit-identical (checked at each checkpoint)
    a, b = load_file(single_run / "checkpoints" / "last.pt"), load_file(out / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 3
    assert a["schedule"] == b["schedule"]  # same effective batch 16 -> same lr, same steps per epoch
    assert b["world_size"] == 2
    assert_same_training_state(a, b)
    ma, mb = metrics(single_run), metrics(out)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb):  # rank 0 logs the mean over ranks: the global batch's loss
        for key in ("loss", "mae_loss", "bc_loss", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
