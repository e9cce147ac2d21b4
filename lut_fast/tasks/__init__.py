"""Pre-training methods as tasks: one file per method, one registry line each (``lut_fast/tasks/base.py``).

A new method = a model file (``lut_fast/models/``), a task file here, its line in
``TASKS`` and its ``METHOD_DEFAULTS`` entry in ``lut_fast/config.py``.
"""

from __future__ import annotations

from lut_fast.errors import UserError
from lut_fast.tasks.base import Task
from lut_fast.tasks.lut import LUTTask
from lut_fast.tasks.mae import MAETask
from lut_fast.tasks.simmim import LUTSimMIMTask, SimMIMTask

TASKS: dict[str, type[Task]] = {"mae": MAETask, "lut": LUTTask, "simmim": SimMIMTask, "lut_simmim": LUTSimMIMTask}


def build_task(cfg) -> Task:
    """The task (model, and target where the method has one) for ``cfg.method``."""
    if cfg.method not in TASKS:
        raise UserError(f"unknown method {cfg.method!r}; choose from {', '.join(TASKS)}")
    return TASKS[cfg.method].from_config(cfg)


__all__ = ["TASKS", "LUTSimMIMTask", "LUTTask", "MAETask", "SimMIMTask", "Task", "build_task"]
