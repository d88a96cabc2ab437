"""The runner's tasks, one file each, registered by name (``experiments.ablation.list_tasks()``).

Every module of this package is imported on the first lookup (``pkgutil``), so a new built-in task is
one new file here; nothing else lists tasks. See ``base.py`` for the contract.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import TASKS, Built, Task, get_task, list_tasks, make_task, register_task, task_options

_discovered = False


def discover() -> None:
    """Import every module of this package once (their ``@register_task`` decorators run)."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: a task module that looks a task up must not recurse
    try:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base" and not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
    except BaseException:
        _discovered = False  # a broken task module fails every lookup, never a silently partial list
        raise


__all__ = ["TASKS", "Built", "Task", "discover", "get_task", "list_tasks", "make_task", "register_task",
           "task_options"]
