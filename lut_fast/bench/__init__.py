"""``lut-fast bench``: throughput against the MAE baseline and against the hardware's limits.

cli.py (the typer commands), data.py (pipelines vs the JPEG decode floor),
train_step.py (MAE / LUT step variants, FLOPs, MFU), e2e.py (the real loop,
input- vs compute-bound), report.py (JSON, tables, compare), machine.py,
measure.py (CPU time of worker trees, peak memory), gpu_check.py (the GPU
preset, runnable from an uninstalled checkout).
"""
