"""What a task is: a registered class that builds a fresh model and seeded data, evaluates a model,
and declares the metrics it reports with their direction.

A task file looks like this (the whole contract)::

    from dataclasses import dataclass
    from lowrank_ablation import Built, Task, register_task

    @register_task("my-task")
    class MyTask(Task):
        \"\"\"One line shown by list_tasks().\"\"\"

        @dataclass(frozen=True)
        class Options:              # the sweep config's [task] table, validated before anything runs
            n_train: int = 1000

        metrics = {"loss": "min", "exact_match": "max"}   # name -> "min" | "max"; "loss" is required
        headline = "exact_match"                          # what the tables report first

        def __init__(self, options):  # loads data once per sweep
            self.options = options

        def build(self, seed: int, batch_size: int) -> Built: ...
        def evaluate(self, model, batches, progress: bool = False) -> dict[str, float]: ...

A metric that is a mean over examples (exact match, pass@1) may also come per example: ``evaluate``
returns ``"outcomes": {"exact_match": [1, 0, ...]}`` beside the metrics, in the order of the examples in
``batches`` (``lowrank_ablation.outcomes``); the summary then pairs arms example by example and its
interval counts the test examples as a sample too.

The runner, the rate search and the summary read metric names and directions from the class; nothing
in them matches on task names. Tasks outside the repository register the same way from a module that
the sweep config lists under ``plugins = ["module"]`` or that a package exposes through the
``lowrank.plugins`` entry-point group.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from torch import nn

from lowrank._options import build_options
from lowrank.registry import Registry

TASKS = Registry("task")
DIRECTIONS = ("min", "max")


@dataclass
class Built:
    """Everything one run needs, fresh for each run (``Task.build``)."""

    model: nn.Module
    targets: Any
    """The LoRA targets (names or one regex, as ``LoRAConfig.targets``)."""
    head: list[str]
    """Modules trained in full beside the adapters (a new classification head), at the sweep's ``head_lr``."""
    train: Iterator[Any]
    """The seeded training stream (batches, without end)."""
    init_batches: list[Any]
    """Batches a data-driven initializer reads (drawn from the training split with another seed)."""
    val_batches: list[Any]
    """Model selection (learning-rate search) and the eval curve."""
    test_batches: list[Any]
    """Reported only; never used to choose anything."""


class Task:
    """Base class of the runner's tasks (see the module docstring for the contract)."""

    @dataclass(frozen=True)
    class Options:
        pass

    metrics: ClassVar[dict[str, str]] = {"loss": "min"}
    """Metric name -> ``"min"`` (lower is better) or ``"max"``; ``evaluate`` returns exactly these keys."""
    headline: ClassVar[str] = "loss"
    """The metric the tables and plots lead with."""
    units: ClassVar[dict[str, str]] = {}
    """Metric name -> what it measures with its unit, for axis labels (e.g. ``"nats per response token"``)."""
    example: ClassVar[str] = "examples"
    """What one batch element is, for axis labels (``"sequences"``, ``"definitions"``)."""
    registry_name: ClassVar[str]

    def __init__(self, options: Any):
        self.options = options

    def build(self, seed: int, batch_size: int) -> Built:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: list[Any], progress: bool = False) -> dict[str, float]:
        """The task's metrics on ``batches`` (and optionally ``"outcomes"``, per example: the module docstring);
        leaves the model's modes and grad flags as it found them."""
        raise NotImplementedError

    @classmethod
    def check_select(cls, select: str, options: Any) -> None:
        """``ValueError`` when the validation metric ``select`` cannot choose a learning rate with these options
        (called only when a sweep chooses among rates); default: every declared metric can."""

    @classmethod
    def describe(cls, options: Any) -> str:
        """A short human title (for plots): the task and, where it has one, the model and data."""
        return cls.registry_name


def positive(options: Any, *names: str) -> None:
    """``ValueError`` unless every named option is a positive integer (``None`` allowed)."""
    for key in names:
        v = getattr(options, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{key} must be a positive integer, got {v!r}")


@contextlib.contextmanager
def restoring_modes(model: nn.Module):
    """A context manager that puts ``model`` in eval mode and restores every module's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def register_task(name: str, cls: type | None = None, *, override: bool = False):
    """Register a :class:`Task` subclass as ``name`` (decorator or plain call). Checks the declaration:
    ``Options`` a dataclass, ``metrics`` directions ``"min"``/``"max"`` with ``"loss"`` among them, and
    ``headline`` one of the metrics."""

    def decorator(c: type) -> type:
        where = f"task {name!r} ({c.__module__}.{c.__qualname__})"
        if not (isinstance(c, type) and issubclass(c, Task)):
            raise TypeError(f"{where}: a task must subclass lowrank_ablation.Task")
        if not dataclasses.is_dataclass(c.Options):
            raise TypeError(f"{where}: Options must be a dataclass")
        bad = {k: v for k, v in c.metrics.items() if v not in DIRECTIONS}
        if not c.metrics or "loss" not in c.metrics or bad:
            raise ValueError(f"{where}: metrics must map names to 'min' or 'max' and include 'loss'; got "
                             f"{c.metrics!r}")
        if c.headline not in c.metrics:
            raise ValueError(f"{where}: headline {c.headline!r} is not one of its metrics {list(c.metrics)}")
        TASKS.register(name, c, override=override)
        return c

    return decorator if cls is None else decorator(cls)


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; ``ValueError`` with the closest names when unknown."""
    from .discovery import discover

    discover()
    try:
        return TASKS.get(name)
    except KeyError as exc:
        raise ValueError(str(exc.args[0]).replace("lowrank.list_tasks()", "lowrank_ablation.list_tasks()")) \
            from None


def list_tasks(pattern: str = "*") -> list[str]:
    """Registered task names matching the shell-style ``pattern``."""
    from .discovery import discover

    discover()
    return TASKS.list(pattern)


def task_options(name: str, table: dict[str, Any]) -> Any:
    """The validated ``Options`` of task ``name`` from a config's ``[task]`` table (unknown keys list the
    valid ones; every value type-checked; the task's own ``__post_init__`` checks ranges)."""
    if not isinstance(table, dict):
        raise ValueError(f"expected a table of options, got {table!r}")
    return build_options(get_task(name).Options, table, "task", name)


def make_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """Validate ``options`` and build task ``name`` (loads its data once)."""
    return get_task(name)(task_options(name, options or {}))
