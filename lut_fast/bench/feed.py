"""Does the loader keep the training device fed? Two measurements for the GPU check.

1. ``bench_loader_feed``: the torch loader as the trainer iterates it (``Batch``
   on the device, ``finish_batch`` included), with no model: images/s, CPU ms
   per image of the whole process tree, and of the training process alone
   (its threads: the consumer, the DataLoader's pinning thread, the intra-op
   pool). A loader that makes more images/s than the train step takes feeds
   it; the training process's share is what the step's own Python competes
   with.
2. ``profile_device_stage``: the host side of ``finish_batch`` for LUT (view
   2's photometric ops on the device): CPU ms per image with torch's intra-op
   pool at its default size and at one thread (a gap means some host op runs
   on the pool, whose threads then spin), and a ``torch.profiler`` table of
   the ops by host time, written beside the report.

Both run on the CPU too (the GPU check's ``--quick`` smoke test), where the
figures only show that the code runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lut_fast.bench.measure import cpu_seconds_tree, median, round_sig, synchronizer
from lut_fast.bench.report import row


def bench_loader_feed(data: str, recipe: str, batch_size: int, workers: int, worker_kind: str, device: torch.device,
                      img_size: int = 224, warmup_batches: int = 4, timed_batches: int = 16) -> dict:
    """The torch loader's ``Batch`` stream on ``device``, alone, across epoch boundaries (see the module doc)."""
    from lut_fast.pipelines import build_loader
    from lut_fast.pipelines.spec import AugSpec

    key = f"feed/torch/{recipe}/{worker_kind}-{workers}/b{batch_size}"
    label = f"torch {recipe.upper()} batches on {device.type}, {workers} {worker_kind}, batch {batch_size}"
    loader = None
    try:
        loader = build_loader("torch", data, AugSpec(recipe=recipe, img_size=img_size), batch_size, device=device,
                              num_workers=workers, seed=0, channels_last=True, workers=worker_kind)
        epoch, batches = 0, None

        def next_batch():
            nonlocal epoch, batches
            while True:
                if batches is None:
                    loader.set_epoch(epoch)
                    batches = iter(loader)
                b = next(batches, None)
                if b is not None:
                    return b
                batches, epoch = None, epoch + 1

        sync = synchronizer(device)
        for _ in range(warmup_batches):
            next_batch()
        sync()
        t0, tree0, own0 = time.perf_counter(), cpu_seconds_tree(), time.process_time()
        for _ in range(timed_batches):
            next_batch()
        sync()
        wall, tree, own = time.perf_counter() - t0, cpu_seconds_tree() - tree0, time.process_time() - own0
    except Exception as e:  # noqa: BLE001 - the row says why; the check goes on
        return row("feed", key, "failed", f"{type(e).__name__}: {str(e)[:300]}", label=label)
    finally:
        if loader is not None:
            loader.close()
    n = timed_batches * batch_size
    return row("feed", key, label=label, backend="torch", recipe=recipe, workers=workers, worker_kind=worker_kind,
               batch_size=batch_size, device=device.type, images_per_sec=round_sig(n / wall),
               cpu_ms_per_image=round_sig(1e3 * tree / n), trainer_process_cpu_ms_per_image=round_sig(1e3 * own / n),
               epochs_crossed=epoch)


def profile_device_stage(device: torch.device, batch_size: int, img_size: int, out_file: Path | None,
                         batches: int = 12) -> dict:
    """Host CPU of ``finish_batch`` (LUT, view 2's ops on the device) at the default intra-op threads and at one."""
    from lut_fast.pipelines import photometric
    from lut_fast.pipelines.batch import RawBatch, finish_batch
    from lut_fast.pipelines.spec import AugSpec

    key = f"feed/device-stage-host/lut/b{batch_size}"
    label = f"device stage host CPU ({device.type}), LUT, batch {batch_size}"
    spec = AugSpec(img_size=img_size)
    g = torch.Generator().manual_seed(0)
    pin = device.type == "cuda"

    def u8() -> torch.Tensor:  # NHWC memory, as the loaders hand views over
        x = torch.randint(0, 256, (batch_size, img_size, img_size, 3), dtype=torch.uint8, generator=g)
        return (x.pin_memory() if pin else x).permute(0, 3, 1, 2)

    raws = [RawBatch(u8(), u8(), torch.arange(batch_size), photometric.sample_params(spec, batch_size, g))
            for _ in range(2)]
    sync = synchronizer(device)
    default_threads = torch.get_num_threads()
    per_threads: dict[int, float] = {}
    try:
        for threads in dict.fromkeys((default_threads, 1)):
            torch.set_num_threads(threads)
            for raw in raws:  # warm-up: caches, kernels
                finish_batch(raw, spec, device, True)
            sync()
            runs = []
            for _ in range(3):
                c0 = time.process_time()
                for i in range(batches):
                    finish_batch(raws[i % 2], spec, device, True)
                sync()
                runs.append((time.process_time() - c0) / (batches * batch_size))
            per_threads[threads] = median(runs)
        if out_file is not None:
            from torch.profiler import ProfilerActivity, profile

            torch.set_num_threads(default_threads)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities, record_shapes=True) as prof:
                for i in range(batches):
                    finish_batch(raws[i % 2], spec, device, True)
                sync()
            table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30)
            Path(out_file).write_text(f"{label}, {batches} batches, intra-op threads {default_threads}\n\n{table}\n")
    except Exception as e:  # noqa: BLE001
        return row("feed", key, "failed", f"{type(e).__name__}: {str(e)[:300]}", label=label)
    finally:
        torch.set_num_threads(default_threads)
    return row("feed", key, label=label, recipe="lut", device=device.type, batch_size=batch_size,
               host_cpu_ms_per_image=round_sig(1e3 * per_threads[default_threads]),
               host_cpu_ms_per_image_one_thread=round_sig(1e3 * per_threads[1]), intra_op_threads=default_threads,
               profile=None if out_file is None else Path(out_file).name)
