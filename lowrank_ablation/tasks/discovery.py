"""Importing every task module of this package once, so that their ``@register_task`` decorators run: a new
built-in task is one new file here, and nothing lists tasks (``pkgutil`` over this folder)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

_discovered = False
SKIP = {"base", "discovery"}


def discover() -> None:
    """Import every module of the tasks package once (skipping ``base``, this module and ``_private`` ones)."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: a task module that looks a task up must not recurse
    try:
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if info.name not in SKIP and not info.name.startswith("_"):
                importlib.import_module(f"{__package__}.{info.name}")
    except BaseException:
        _discovered = False  # a broken task module fails every lookup, never a silently partial list
        raise
