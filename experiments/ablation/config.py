"""Sweep configs (TOML). The first line is the exact command that runs the file; every field is
validated before any training starts (unknown task, initializer, preconditioner or key: a clear
error, nothing run)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lowrank

TASKS = ("wordnet-supersense", "synthetic-lowrank", "hf-text-classification")


def _take(table: dict[str, Any], cls, where: str):
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    try:
        return cls(**table)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Sweep:
    name: str
    task: str
    results: str
    seeds: list[int] = field(default_factory=lambda: [0])
    ranks: list[int] = field(default_factory=lambda: [8])
    lrs: list[float] = field(default_factory=lambda: [2e-4])
    steps: int = 150
    batch_size: int = 32
    eval_every: int = 50
    alpha: float = 16.0
    head_lr: float = 1e-3
    reference: str = "LoRA"
    """The arm whose final training loss defines the convergence speed-up (vanilla LoRA)."""


@dataclass(frozen=True)
class Arm:
    name: str
    init: str = "kaiming"
    init_options: dict[str, Any] = field(default_factory=dict)
    scaling: str = "standard"
    preconditioner: str = "identity"
    preconditioner_options: dict[str, Any] = field(default_factory=dict)
    full_finetune: bool = False
    lrs: list[float] | None = None
    """This arm's own learning-rate grid (default: the sweep's)."""


@dataclass(frozen=True)
class Config:
    path: Path
    command: str
    sweep: Sweep
    task: dict[str, Any]
    arms: list[Arm]

    def runs(self) -> list[dict[str, Any]]:
        """Every run of the sweep as a plain dict (its ``key`` identifies it in the results file)."""
        out = []
        for arm in self.arms:
            ranks = [None] if arm.full_finetune else self.sweep.ranks
            for rank, lr, seed in itertools.product(ranks, arm.lrs or self.sweep.lrs, self.sweep.seeds):
                spec = {"sweep": self.sweep.name, "task": self.sweep.task, "task_options": self.task,
                        "arm": dataclasses.asdict(arm), "rank": rank, "lr": lr, "seed": seed,
                        "steps": self.sweep.steps, "batch_size": self.sweep.batch_size, "alpha": self.sweep.alpha,
                        "head_lr": self.sweep.head_lr, "eval_every": self.sweep.eval_every}
                spec["key"] = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
                out.append(spec)
        return out


def load(path: str | Path) -> Config:
    """Read and validate a sweep config; raises ``ValueError`` naming the field and the fix."""
    path = Path(path)
    text = path.read_text()
    first = text.splitlines()[0] if text else ""
    if not first.startswith("# python -m experiments.ablate"):
        raise ValueError(f"{path}: the first line must be the command that runs it, e.g. "
                         f"'# python -m experiments.ablate {path}'")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"sweep", "task", "arm"})
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; valid: ['sweep', 'task', 'arm']")
    sweep = _take(raw.get("sweep", {}), Sweep, f"{path} [sweep]")
    if sweep.task not in TASKS:
        raise ValueError(f"{path} [sweep]: unknown task {sweep.task!r}; tasks: {list(TASKS)}")
    for name, values, ok in (("seeds", sweep.seeds, lambda v: isinstance(v, int)),
                             ("ranks", sweep.ranks, lambda v: isinstance(v, int) and v > 0),
                             ("lrs", sweep.lrs, lambda v: isinstance(v, (int, float)) and v > 0)):
        if not values or not all(ok(v) for v in values):
            raise ValueError(f"{path} [sweep]: {name} must be a non-empty list of valid values, got {values!r}")
    if sweep.steps <= 0 or sweep.batch_size <= 0 or sweep.eval_every <= 0:
        raise ValueError(f"{path} [sweep]: steps, batch_size and eval_every must be positive")
    from .tasks import check_task_options

    task = dict(raw.get("task", {}))
    check_task_options(sweep.task, task, f"{path} [task]")
    arms = [_take(a, Arm, f"{path} [[arm]] #{i + 1}") for i, a in enumerate(raw.get("arm", []))]
    if not arms:
        raise ValueError(f"{path}: no [[arm]] tables; add at least one arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: arm names must be unique, got {names}")
    for a in arms:
        where = f"{path} arm {a.name!r}"
        if not a.full_finetune:
            try:  # validates init, its options, scaling and alpha
                lowrank.LoRAConfig(rank=sweep.ranks[0], alpha=sweep.alpha, scaling=a.scaling, targets=["x"],
                                   init=a.init, init_options=a.init_options)
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{where}: {exc}") from None
            try:
                lowrank.get_preconditioner(a.preconditioner)(**a.preconditioner_options)
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{where}: {exc}") from None
        if a.lrs is not None and (not a.lrs or not all(isinstance(v, (int, float)) and v > 0 for v in a.lrs)):
            raise ValueError(f"{where}: lrs must be a non-empty list of positive numbers")
    return Config(path, first.lstrip("# ").strip(), sweep, task, arms)
