"""Pre-training methods as tasks: one file per method, one registry line each (``lut_fast/tasks/base.py``).

A new method = a model file (``lut_fast/models/``), a task file here, its line in
``TASKS`` and its ``METHOD_DEFAULTS`` entry in ``lut_fast/config.py``.
"""

from __future__ import annotations

from lut_fast.errors import UserError
from lut_fast.tasks.base import Task
from lut_fast.tasks.lut import LUTTask
from lut_fast.tasks.mae import MAETask

TASKS: dict[str, type[Task]] = {"mae": MAETask, "lut": LUTTask}


def build_task(cfg) -> Task:
    """The task (model, and target where the method has one) for ``cfg.method``."""
    if cfg.method not in TASKS:
        raise UserError(f"unknown method {cfg.method!r}; choose from {', '.join(TASKS)}")
    return TASKS[cfg.method].from_config(cfg)


__all__ = ["TASKS", "LUTTask", "MAETask", "Task", "build_task"]
