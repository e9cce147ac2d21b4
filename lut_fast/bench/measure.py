"""Measuring helpers: CPU seconds of this process and its workers, peak memory, medians."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of one process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()  # fields after "pid (comm)"; comm may hold spaces
    ppid, utime, stime = int(rest[1]), int(rest[11]), int(rest[12])
    return ppid, (utime + stime) / _TICKS


def cpu_seconds_tree(root: int | None = None) -> float:
    """User + system CPU seconds of ``root`` (default: this process, all threads) and its live descendants.

    DataLoader workers are child processes and DALI / FFCV use threads; both
    are counted. Falls back to this process only where there is no /proc.
    """
    root = os.getpid() if root is None else root
    if not os.path.isdir("/proc/self"):
        return time.process_time()
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _read_stat(int(name))
        if st is None:
            continue
        children.setdefault(st[0], []).append(int(name))
        cpu[int(name)] = st[1]
    own = root == os.getpid()
    total = time.process_time() if own else cpu.get(root, 0.0)  # this process: nanosecond clock, all threads
    todo = list(children.get(root, []))
    while todo:  # descendants: /proc's clock ticks (10 ms)
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


class CpuClock:
    """Wall and CPU time between ``start()`` and ``stop()`` for the process tree."""

    def start(self) -> "CpuClock":
        self.t0, self.c0 = time.perf_counter(), cpu_seconds_tree()
        return self

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.t0, cpu_seconds_tree() - self.c0


# ---------------------------------------------------------------- peak memory


def reset_peak_memory(device) -> None:
    """CUDA: reset the allocator's peak. CPU: reset the kernel's peak-RSS mark (Linux ``clear_refs``)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device) -> tuple[float | None, str]:
    """(peak MiB since the last reset, what was measured)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "process_peak_rss"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss_since_start"


def current_memory_mb(device) -> float | None:
    """CUDA: allocated now. CPU: resident set size now (torch's libraries alone are several hundred MiB)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- statistics


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def synchronizer(device) -> Callable[[], None]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def round_sig(x: float | None, digits: int = 4) -> float | None:
    if x is None:
        return None
    return float(f"{x:.{digits}g}")
