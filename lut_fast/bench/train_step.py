"""``bench train``: one optimizer step of MAE, LUT (symmetric) and LUT (one-way) on synthetic inputs.

Inputs (two normalised views) are made once on the device, so data loading
is excluded. A step is ``lut_fast.step.train_step``, the very function
``lut-fast train`` runs per optimizer step (one micro-batch): the masking
noise, the task's losses under autocast (LUT: target outputs under no_grad,
then the student), backward through the GradScaler, lr, AdamW, zero_grad and
the task's hook (LUT: the EMA update). The lr stays near 1e-4 and the EMA
momentum near its start value (a schedule far longer than the bench).

Interleaved: for each variant every method is built at once on the same
inputs and the steps are timed in turn (MAE, LUT, MAE, LUT, ...), one step
each, so a busy spell on a shared machine slows every method alike and the
LUT/MAE ratio stays meaningful. Each row's figure is the median window of
``steps_per_window`` of its own steps.

Variants: eager vs ``torch.compile``, fp32 / bf16 / fp16 autocast, the SDPA
kernel (``torch.nn.attention.sdpa_kernel``: flash, efficient, math, cudnn or
auto = PyTorch's choice), channels-last inputs (what the loader gives training
with ``data.channels_last`` on a GPU; the weights stay as training keeps them).
A variant that cannot run here is a ``skipped`` row with the reason.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch

from lut_fast.bench.measure import current_memory_mb, peak_memory_mb, reset_peak_memory, round_sig, synchronizer
from lut_fast.bench.report import row
from lut_fast.errors import UserError

METHODS = {  # label -> (config method, LUT direction)
    "mae": ("mae", "symmetric"),
    "lut_sym": ("lut", "symmetric"),
    "lut_one_way": ("lut", "one_way"),
    "simmim": ("simmim", "symmetric"),
    "lut_simmim_sym": ("lut_simmim", "symmetric"),
    "lut_simmim_one_way": ("lut_simmim", "one_way"),
}
BASELINE = {"lut": "mae", "lut_simmim": "simmim"}  # config method -> the method its time ratio is taken against
PRECISIONS = ("fp32", "bf16", "fp16")
SDPA = ("auto", "flash", "efficient", "math", "cudnn")
ALL_VARIANTS = {"compile": "off,on", "precision": "fp32,bf16,fp16", "sdpa": "auto,flash,efficient,math", "channels_last": "off,on"}


class Skip(Exception):
    """This variant cannot run on this machine (the message says why)."""


@dataclass(frozen=True)
class Variant:
    compile: bool = False
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16
    sdpa: str = "auto"
    channels_last: bool = False

    @property
    def label(self) -> str:
        return f"{'compiled' if self.compile else 'eager'} {self.precision} sdpa={self.sdpa} {'nhwc' if self.channels_last else 'nchw'}"

    def as_dict(self) -> dict:
        return {"compile": self.compile, "precision": self.precision, "sdpa": self.sdpa, "channels_last": self.channels_last}


def _on_off(text: str, what: str) -> list[bool]:
    out = []
    for v in _split(text):
        if v in ("on", "true", "1", "yes"):
            out.append(True)
        elif v in ("off", "false", "0", "no"):
            out.append(False)
        else:
            raise UserError(f"--{what} takes on/off values, got {v!r}")
    return out


def _split(text: str) -> list[str]:
    return [v.strip().lower() for v in str(text).split(",") if v.strip()]


def resolve_precision(name: str, device: torch.device) -> str:
    """A variant's precision name: ``auto`` follows the trainer's rule (``lut_fast/runtime.py``); the others
    are kept as asked, so one this device cannot run becomes a ``skipped`` row rather than an error."""
    from lut_fast.runtime import precision_name, resolve_precision as training_precision

    return precision_name(training_precision("auto", device)) if name == "auto" else name


def make_variants(device: torch.device, compile: str = "off", precision: str = "auto", sdpa: str = "auto",
                  channels_last: str = "off", grid: bool = False) -> list[Variant]:
    """Variants from comma lists. Default: the first value of each list is the baseline and every other
    value is tried alone against it (one factor at a time); ``grid`` gives the full cross product."""
    comp = _on_off(compile, "compile")
    prec = [resolve_precision(p, device) for p in _split(precision)]
    kern = _split(sdpa)
    cl = _on_off(channels_last, "channels-last")
    for p in prec:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision {p!r}; choose from auto, {', '.join(PRECISIONS)}")
    for k in kern:
        if k not in SDPA:
            raise UserError(f"unknown SDPA backend {k!r}; choose from {', '.join(SDPA)}")
    if not (comp and prec and kern and cl):
        raise UserError("every variant list needs at least one value")
    if grid:
        out = [Variant(c, p, k, x) for c, p, k, x in itertools.product(comp, prec, kern, cl)]
    else:
        base = Variant(comp[0], prec[0], kern[0], cl[0])
        out = [base]
        for field, values in (("compile", comp), ("precision", prec), ("sdpa", kern), ("channels_last", cl)):
            for v in values[1:]:
                out.append(Variant(**{**base.as_dict(), field: v}))
    seen, unique = set(), []
    for v in out:
        if v not in seen:
            seen.add(v)
            unique.append(v)
    return unique


def sdpa_context(name: str):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    return sdpa_kernel(backend)


def check_runnable(v: Variant, device: torch.device) -> None:
    """Raise ``Skip`` for variants known not to run (or not to mean anything) on this device."""
    if device.type != "cuda" and v.channels_last:
        raise Skip("training uses channels-last inputs only on a GPU (data.channels_last), so there is nothing to compare here")
    if device.type == "cpu" and v.precision == "fp16":
        raise Skip("fp16 autocast is a GPU setting (V100, with loss scaling); on CPU use fp32 or bf16")
    if device.type == "cuda" and v.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise Skip("this GPU has no bf16")
    if device.type == "cuda" and v.sdpa == "flash":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            raise Skip("flash attention needs an sm80+ GPU")
        if v.precision == "fp32":
            raise Skip("flash attention needs fp16/bf16 inputs (fp32 variant)")
    if v.compile and device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise Skip("torch.compile on CUDA needs triton, which is not installed") from None


def _amp_dtype(p: str):
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def make_inputs(device: torch.device, batch_size: int, img_size: int, seed: int = 0) -> dict:
    """Two normalised-looking views, made once and shared by every method's step."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, img_size, img_size)
    return {"view1": torch.randn(shape, generator=g).to(device), "view2": torch.randn(shape, generator=g).to(device)}


def build_step(cfg, device: torch.device, v: Variant, batch_size: int, inputs: dict | None = None,
               schedule=None) -> Callable[..., torch.Tensor]:
    """A closure running one optimizer step of the trainer's ``train_step``; returns the loss (on the device).

    It steps on fixed synthetic ``inputs`` (or its own), or on the ``Batch`` it is given. ``schedule``:
    the lr / momentum schedule (default: one far longer than any bench, so lr ~ 1e-4 throughout).
    """
    import copy

    from lut_fast.pipelines.batch import Batch
    from lut_fast.step import Schedule, build_train_state, seed_everything, train_step
    from lut_fast.tasks import build_task

    cfg = copy.deepcopy(cfg)
    cfg.run.compile, cfg.optim.accum_steps, cfg.optim.batch_size = v.compile, 1, batch_size
    seed_everything(cfg.run.seed)
    task = build_task(cfg)
    if schedule is None:
        schedule = Schedule(steps_per_epoch=1, total_steps=10**9, warmup_steps=0, peak_lr=1e-4, eff_batch=batch_size)
    state = build_train_state(cfg, task, schedule, device, _amp_dtype(v.precision))
    if inputs is None:
        inputs = make_inputs(device, batch_size, cfg.model.img_size)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    fixed = Batch(inputs["view1"].contiguous(memory_format=fmt),
                  inputs["view2"].contiguous(memory_format=fmt) if task.views == 2 else None,
                  torch.zeros(batch_size, dtype=torch.long))

    def step(batch: Batch | None = None) -> torch.Tensor:
        with sdpa_context(v.sdpa):
            return train_step(state, [batch if batch is not None else fixed])["loss"]

    return step


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


class _Method:
    """One method's step for one variant, and its timed steps."""

    def __init__(self, cfg, method: str, v: Variant, flops_per_image: float, batch_size: int):
        self.cfg, self.method, self.v, self.flops = cfg, method, v, flops_per_image
        self.key = f"train/{method}/{v.label}"
        self.common = dict(method=method, model=cfg.model.name, variant=v.as_dict(), label=f"{method:<11} {v.label}",
                           batch_size=batch_size, gflops_per_image=round_sig(flops_per_image / 1e9, 5))
        self.step: Callable[[], torch.Tensor] | None = None
        self.failure: dict | None = None
        self.times: list[float] = []
        self.first_step_s: float | None = None
        self.warmup_s = 0.0
        self.mem_before: float | None = None

    def fail(self, e: BaseException) -> None:
        self.step = None
        if isinstance(e, Skip):
            self.failure = row("train", self.key, "skipped", str(e), **self.common)
        elif isinstance(e, torch.cuda.OutOfMemoryError):
            self.failure = row("train", self.key, "failed", f"out of GPU memory at batch {self.common['batch_size']} "
                               "(the methods of a variant are held together, to interleave them)", **self.common)
        else:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "No viable backend" in msg or "No available kernel" in msg:
                self.failure = row("train", self.key, "skipped", f"SDPA {self.v.sdpa} kernel not available here: {msg[:160]}", **self.common)
            else:
                self.failure = row("train", self.key, "failed", f"{type(e).__name__}: {msg[:300]}", **self.common)


def interleave_steps(methods: list, rounds: int, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> list[str]:
    """``rounds`` rounds of one timed step of each live method in turn (MAE, LUT, MAE, LUT, ...); returns the order."""
    order = []
    for _ in range(rounds):
        for m in methods:
            if m.step is None:
                continue
            sync()
            t = clock()
            try:
                m.step()
                sync()
            except Exception as e:  # noqa: BLE001 - one method failing must not stop the others
                m.fail(e)
                continue
            m.times.append(clock() - t)
            order.append(m.method)
    return order


def bench_variant_methods(cfgs: dict, flops: dict, v: Variant, device: torch.device, batch_size: int, warmup: int,
                          windows: int, steps_per_window: int, peak_tflops: float | None,
                          say: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """Every method of one variant, built together and timed step by step in turn on the same inputs."""
    methods = [_Method(cfgs[m], m, v, flops[m], batch_size) for m in cfgs]
    sync = synchronizer(device)
    try:
        inputs = None
        for m in methods:
            try:
                check_runnable(v, device)
                m.mem_before = current_memory_mb(device)
                if inputs is None:
                    inputs = make_inputs(device, batch_size, m.cfg.model.img_size)
                m.step = build_step(m.cfg, device, v, batch_size, inputs)
                t0 = time.perf_counter()
                loss = m.step()
                sync()
                m.first_step_s = time.perf_counter() - t0
                if not torch.isfinite(loss).item():
                    raise RuntimeError(f"loss is {loss.item()} after the first step")
            except Exception as e:  # noqa: BLE001
                m.fail(e)
        live = [m for m in methods if m.step is not None]
        if live:
            per_round = sum(m.first_step_s or 0 for m in live)
            say(f"  {v.label}: first steps took {per_round:.1f} s in all; about "
                f"{per_round * (max(0, warmup - 1) + windows * steps_per_window):.0f} s more for this variant")
        t0 = time.perf_counter()
        interleave_steps(methods, max(0, warmup - 1), sync)
        for m in methods:
            m.times.clear()
        warmup_s = time.perf_counter() - t0
        reset_peak_memory(device)
        order = interleave_steps(methods, windows * steps_per_window, sync)
        peak, peak_kind = peak_memory_mb(device)
    finally:
        for m in methods:
            m.step = None
        _cleanup(device)
    out = []
    for m in methods:
        if m.failure is not None:
            out.append(m.failure)
            continue
        per_step = [sum(m.times[i * steps_per_window : (i + 1) * steps_per_window]) / steps_per_window for i in range(windows)]
        ms = sorted(per_step)[len(per_step) // 2] * 1000  # median window (upper median for even counts)
        ips = batch_size / (ms / 1000)
        achieved = m.flops * ips / 1e12
        r = row(
            "train", m.key, **m.common,
            ms_per_step=round_sig(ms), ms_per_step_windows=[round_sig(x * 1000) for x in per_step],
            images_per_sec=round_sig(ips), peak_mem_mb=round_sig(peak), peak_mem_kind=peak_kind,
            peak_mem_scope="all methods of this variant, held together", mem_before_build_mb=round_sig(m.mem_before),
            achieved_tflops=round_sig(achieved), first_step_s=round_sig(m.first_step_s), warmup_s=round_sig(warmup_s),
            mfu=round_sig(achieved / peak_tflops) if peak_tflops else None, step_order=order[: len(methods) * 2],
        )
        if not peak_tflops:
            r["mfu_reason"] = "no GPU" if device.type != "cuda" else "unknown GPU peak: pass --peak-tflops"
        out.append(r)
    return out


def add_time_ratios(results: list[dict]) -> None:
    """LUT/MAE step-time ratio for each LUT row against the MAE row of the same model, batch and variant
    (paper: 1.18 for ViT-B); for LUT on SimMIM, the same against the SimMIM row (``lut_simmim_time_ratio``)."""
    def same(r: dict) -> tuple:
        return r.get("model"), r.get("batch_size"), tuple(sorted(r.get("variant", {}).items()))

    ok = [r for r in results if r.get("bench") == "train" and r["status"] == "ok"]
    base_rows = {(r.get("method"), same(r)): r for r in ok if r.get("method") in BASELINE.values()}
    for r in ok:
        kind = METHODS.get(r.get("method"), ("", ""))[0]
        base = base_rows.get((BASELINE.get(kind), same(r)))
        if base is not None:
            prefix = "lut_mae" if kind == "lut" else "lut_simmim"
            r[f"{prefix}_time_ratio"] = round_sig(r["ms_per_step"] / base["ms_per_step"])
            r[f"{prefix}_flop_ratio"] = round_sig(r["gflops_per_image"] / base["gflops_per_image"])


def run_train_bench(model: str, methods: list[str], variants: list[Variant], device: torch.device, batch_size: int,
                    img_size: int, patch_size: int, sets: list[str], warmup: int, windows: int, steps_per_window: int,
                    peak_tflops: float | None, on_row: Callable[[dict], None] | None = None,
                    say: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """For each variant, every method built together and timed step by step in turn (``bench_variant_methods``)."""
    from lut_fast.config import load_config
    from lut_fast.flops import flops_per_image

    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if warmup < 1 or windows < 1 or steps_per_window < 1:
        raise UserError("--warmup, --windows and --steps-per-window must be >= 1")
    cfgs, flops = {}, {}
    for method in methods:
        kind, direction = METHODS[method]
        flags = {"method": kind, "model.name": model, "model.img_size": img_size, "model.patch_size": patch_size,
                 "lut.direction": direction}
        cfgs[method] = load_config(None, flags, sets)
        flops[method] = flops_per_image(cfgs[method]).total
    results = []
    for v in variants:
        for r in bench_variant_methods(cfgs, flops, v, device, batch_size, warmup, windows, steps_per_window,
                                       peak_tflops, say):
            results.append(r)
            add_time_ratios(results)
            if on_row is not None:
                on_row(r)
    return results
