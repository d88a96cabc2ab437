"""The ablation runner: sweeps of initializer x preconditioner x rank x learning rate x seed.

    lowrank ablate demo                  # a bundled preset (lowrank presets): run (resumes), then summarize
    lowrank ablate mine.toml --summary-only

Installed with ``pip install lowrank[experiments]`` (the command is :mod:`lowrank_ablation.cli`; the bundled
configs are :mod:`lowrank_ablation.presets`). Nothing in the core library imports this package.

``config`` validates a TOML sweep before anything runs, ``tasks`` are plug-ins that build models and
data and evaluate (``register_task``, ``make_task``, ``list_tasks``), ``run`` trains one arm and appends
one JSON line per run, ``search`` plans learning rates, ``summary`` and ``plots`` make the tables and
figures; ``data`` loads the offline model and data the built-in tasks use.
"""

from .tasks import Built, Task, get_task, list_tasks, make_task, register_task

__all__ = ["Built", "Task", "get_task", "list_tasks", "make_task", "register_task"]
