"""The runner's tasks, one file each, registered by name (``lowrank_ablation.list_tasks()``).

Every module of this package is imported on the first lookup (``discovery.py``), so a new built-in task is
one new file here; nothing else lists tasks. See ``base.py`` for the contract.
"""

from __future__ import annotations

from .base import TASKS, Built, Task, get_task, list_tasks, make_task, register_task, task_options
from .discovery import discover

__all__ = ["TASKS", "Built", "Task", "discover", "get_task", "list_tasks", "make_task", "register_task",
           "task_options"]
