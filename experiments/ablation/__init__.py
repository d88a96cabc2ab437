"""The ablation runner: sweeps of initializer x preconditioner x rank x learning rate x seed.

    python -m experiments.ablate experiments/configs/demo.toml          # run (resumes), then summarize
    python -m experiments.ablate experiments/configs/demo.toml --summary-only

``config`` validates a TOML sweep before anything runs, ``tasks`` are plug-ins that build models and
data and evaluate (``register_task``, ``make_task``, ``list_tasks``), ``run`` trains one arm and appends
one JSON line per run, ``search`` plans learning rates, ``summary`` and ``plots`` make the tables and
figures.
"""

from .tasks import Built, Task, get_task, list_tasks, make_task, register_task

__all__ = ["Built", "Task", "get_task", "list_tasks", "make_task", "register_task"]
