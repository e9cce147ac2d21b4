"""Data parallelism through torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

``torchrun --nproc-per-node N -m lut_fast.cli train ...`` (or ``torchrun
--no-python lut-fast train ...``) starts one process per device; each joins
the process group here: NCCL on GPUs, gloo on CPU. Multi-node runs use
torchrun's rendezvous arguments (``--nnodes``, ``--rdzv-backend c10d``,
``--rdzv-endpoint HOST:PORT``); nothing here depends on the node count.

Under ``torchrun --max-restarts K`` a failed worker makes torchrun restart
the whole group with ``TORCHELASTIC_RESTART_COUNT`` > 0; the trainer then
resumes from the run's last checkpoint by itself (``restart_count``).

SyncBatchNorm: torch's ``nn.SyncBatchNorm`` runs on GPUs only (DDP refuses
it on CPU), so CPU (gloo) processes get ``GlooSyncBatchNorm``, the same
computation through differentiable all-reduces. Both keep BatchNorm's
parameter and buffer names, so checkpoints move freely between the two and
a single-process model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        timeout = datetime.timedelta(minutes=30)
        # torchrun keeps one key-value store (MASTER_ADDR:MASTER_PORT) across restarts of the worker
        # group; the process group's keys from the failed attempt are still in it, and restarted
        # workers would read the dead workers' addresses (gloo: "connectFullMesh failed ... Connection
        # refused"). A prefix per attempt gives every attempt fresh keys.
        store, _, _ = next(dist.rendezvous("env://", rank=info.rank, world_size=world, timeout=timeout))
        store = dist.PrefixStore(f"lut_fast/attempt_{restart_count()}", store)
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            store=store, rank=info.rank, world_size=world, timeout=timeout,
        )
    return info


def launched_by_torchrun() -> bool:
    """Whether torchrun's agent started this process (it sets TORCHELASTIC_RUN_ID, also for one process)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def stop_when_parent_dies(request_stop: Callable[[], None], poll_s: float = 1.0) -> None:
    """Call ``request_stop`` once this process's parent (torchrun's agent) is gone.

    A SIGKILLed agent cannot stop its workers, which would otherwise train
    on as orphans. Two detectors: on Linux the kernel's parent-death signal
    (``prctl(PR_SET_PDEATHSIG)``, SIGUSR2 here, whose handler checks that the
    parent really changed: the signal also fires when the thread that forked
    us ends), and everywhere a daemon thread that polls ``os.getppid()``.
    The train loop then stops at the next step like on SIGTERM, with a
    checkpoint (the ranks agree on the step through an all-reduce).
    """
    parent = os.getppid()
    done = threading.Event()

    def parent_gone() -> bool:
        return os.getppid() != parent

    def fire() -> None:
        if not done.is_set():
            done.set()
            print(f"lut-fast: rank {os.environ.get('RANK', '0')}: the launcher (pid {parent}) is gone: "
                  "checkpointing and stopping", file=sys.stderr)
            request_stop()

    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            pr_set_pdeathsig = 1
            signal.signal(signal.SIGUSR2, lambda signum, frame: fire() if parent_gone() else None)
            libc.prctl(pr_set_pdeathsig, int(signal.SIGUSR2), 0, 0, 0)
        except (OSError, AttributeError, ValueError):
            pass  # no prctl here: the watchdog below still notices
    if parent_gone():  # died before the signal was armed
        fire()
        return

    def watch() -> None:
        while not done.wait(poll_s):
            if parent_gone():
                fire()

    threading.Thread(target=watch, name="lut-fast-parent-watch", daemon=True).start()


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_max(flag: bool, device) -> bool:
    """True on every rank if it is true on any (a stop request must reach all ranks)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_same(value: int, device) -> bool:
    """Whether every rank passed the same integer (one MIN and one MAX all-reduce)."""
    if not _active():
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0]) == value and int(-t[1]) == value


def all_reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    """The mean over ranks of each value (every rank must pass the same keys)."""
    if not _active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    mean = dict(zip(keys, t.tolist()))
    return {k: mean[k] for k in values}


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """An exact integer checksum of the tensors' bits (identical bits -> identical number)."""
    total = None
    for i, t in enumerate(tensors):
        flat = t.detach().contiguous().view(-1)
        bits = flat.view(_SAME_SIZE_INT[flat.element_size()])  # the raw bits as integers
        # weights by position so that swapped values change the sum (int64 overflow wraps: still exact)
        pos = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 65_521
        s = ((bits.to(torch.int64) * pos).sum() % 1_000_000_007) * (i + 1)
        total = s if total is None else (total + s) % 1_000_000_007
    return 0 if total is None else int(total)


def replicas_in_sync(tensors: Iterable[torch.Tensor], device) -> bool:
    """Whether every rank holds bit-identical tensors (a cheap check, run at checkpoints)."""
    if not _active():
        return True
    return all_same(fingerprint(tensors), device)


def broadcast_from_main(tensors: Iterable[torch.Tensor], device) -> None:
    """Overwrite every rank's tensors with rank 0's (in place; through ``device``, as NCCL needs)."""
    if not _active():
        return
    device = torch.device(device)
    with torch.no_grad():
        for t in tensors:
            if t.device == device:
                dist.broadcast(t, src=0)
            else:
                tmp = t.to(device)
                dist.broadcast(tmp, src=0)
                t.copy_(tmp)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- SyncBatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum-of-losses objective is summed back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover the whole global batch, for CPU (gloo) processes.

    Two differentiable all-reduces (sum, then centred sum of squares), so the
    result equals BatchNorm over the concatenation of all ranks' batches;
    the backward pass all-reduces the same terms (as ``nn.SyncBatchNorm``
    does on GPUs). Outside a process group, or in eval mode, plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([float(xf.numel() // xf.shape[1])], dtype=torch.float64)
        dist.all_reduce(count)
        n = float(count.item())
        mean = all_reduce(xf.sum(dims)) / n
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(x.dtype)


def _to_gloo_sync(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            device=next(iter(module.buffers()), torch.empty(0)).device,
        )
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_gloo_sync(child))
    return out


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm in ``module`` synchronised across ranks: torch's SyncBatchNorm on GPUs, ours on CPU."""
    if device_type == "cpu":
        return _to_gloo_sync(module)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
