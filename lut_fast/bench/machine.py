"""What machine a figure came from: CPU, cores, GPU, library versions; and the GPU's bf16 peak."""

from __future__ import annotations

import os
import platform
from importlib import metadata

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name, from the vendors' data sheets.
# The first matching substring wins, so the more specific names come first.
BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("RTX 4090", 165.2),
    ("A6000", 154.8),
)


def bf16_peak_tflops(gpu_name: str | None) -> float | None:
    """The card's dense bf16 peak, or None for an unknown card (then pass ``--peak-tflops``)."""
    if not gpu_name:
        return None
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            return peak
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """A JSON-ready description of this machine and its software (no heavy imports: DALI/FFCV by metadata)."""
    import torch

    info: dict = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "pillow": _version("pillow"),
        "libjpeg_turbo": _libjpeg_turbo_version(),
        "dali": _version("nvidia-dali-cuda130") or _version("nvidia-dali-cuda120"),
        "ffcv": _version("ffcv"),
        "load_avg_1m": _load_avg(),  # other work on the machine while measuring (shared hosts)
        "gpu_name": None,
        "gpu_count": 0,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpu_bf16=torch.cuda.is_bf16_supported(),
            gpu_bf16_peak_tflops=bf16_peak_tflops(props.name),
            cuda_driver=_driver_version(),
        )
    return info


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _libjpeg_turbo_version() -> str | None:
    try:
        from PIL import features

        return features.version("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None
    except Exception:  # noqa: BLE001 - optional information
        return None


def _driver_version() -> str | None:
    try:
        import torch

        return str(torch._C._cuda_getDriverVersion())
    except Exception:  # noqa: BLE001 - optional information
        return None


def describe(info: dict) -> str:
    """One line: 'AMD EPYC, 2 cores, no GPU, torch 2.14.1'."""
    gpu = f"{info['gpu_name']} (CUDA {info.get('cuda')})" if info.get("gpu_name") else "no GPU"
    return f"{info['cpu_model']}, {info['cpu_cores_usable']} cores, {gpu}, torch {info['torch']}"
