"""Sweep configs (TOML). The first line is the exact command that runs the file; every field is
validated before any training starts (unknown task, initializer, preconditioner or key, a value of
the wrong type or out of range: a clear error, nothing run).

A top-level ``plugins = ["module", ...]`` list names modules imported before anything is validated (tasks,
initializers or preconditioners registered outside the repository; the config file's folder is put first
on ``sys.path``); with plugins the first line may be any command that runs the file.

Learning rates: ``lrs = [...]`` runs every listed rate; ``lrs = "search"`` searches each arm's rate on
the validation split (``[search]`` table, ``lowrank_ablation/search.py``), then runs the sweep's
seeds at the chosen rate; ``lrs = "transfer"`` searches the reference arm only and starts every other
arm at the rate ``lowrank.theory.transfer_lr`` predicts for it. An arm's own ``lrs`` list overrides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli (the experiments extra installs it)
    import tomli as tomllib

import lowrank

from .records import RunSpec

LR_MODES = ("search", "transfer")
DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda", "auto")


def _take(table: dict[str, Any], cls, where: str):
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table, got {table!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    try:
        return cls(**table)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


SCHEDULES = ("constant", "cosine")


def _is_rate(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check(where: str, name: str, value, ok, what: str) -> None:
    if not ok(value):
        raise ValueError(f"{where}: {name} must be {what}, got {value!r}")


def _check_int_list(where: str, name: str, values, positive: bool) -> None:
    ok = (lambda v: _is_int(v) and v > 0) if positive else (lambda v: _is_int(v) and v >= 0)
    _check(where, name, values, lambda vs: isinstance(vs, list) and vs and all(ok(v) for v in vs)
           and len(set(vs)) == len(vs), f"a non-empty list of distinct {'positive' if positive else 'non-negative'} "
           "integers")


@dataclass(frozen=True)
class Sweep:
    name: str
    task: str
    results: str
    seeds: list[int] = field(default_factory=lambda: [0])
    ranks: list[int] = field(default_factory=lambda: [8])
    lrs: list[float] | str = field(default_factory=lambda: [2e-4])
    """A list of rates, ``"search"`` or ``"transfer"`` (see the module docstring)."""
    steps: int = 150
    batch_size: int = 32
    eval_every: int = 50
    alpha: float = 16.0
    head_lr: float = 1e-3
    reference: str = "LoRA"
    """The arm others are compared with: paired test-metric differences, steps to its final training
    loss; under ``lrs = "transfer"`` the arm whose searched rate is transferred."""
    dtype: str = "float32"
    """The model's dtype for training and evaluation (``"bfloat16"``: adapters in bf16 too; data-driven
    inits still accumulate their statistics in float32)."""
    device: str = "auto"
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (Hugging Face models' ``gradient_checkpointing_enable``)."""
    schedule: str = "constant"
    """The learning rate over the run: ``"constant"`` or ``"cosine"`` (to 0 at the last step), each after a linear
    warmup from 0 over ``ceil(warmup_ratio * steps)`` steps (Hugging Face's ``get_*_schedule_with_warmup``)."""
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = None
    """Clip the trained parameters' gradient norm to this before each step (the Hugging Face Trainer's 1.0);
    default: no clipping."""
    weight_decay: float | None = None
    """AdamW's decoupled weight decay on every trained parameter; default: the optimizer's own (torch's AdamW:
    0.01; the Hugging Face Trainer's default is 0.0)."""
    equivalence_margin: float | None = None
    """A difference in the headline metric small enough to call two arms equivalent: each arm's verdict then also
    says ``equivalent`` (its 95% paired interval inside ``(-m, m)``), ``better``, ``worse`` or ``undecided``."""

    def training(self) -> dict[str, Any]:
        """The settings beyond the defaults that change a run's numbers (part of its key; the device is not)."""
        keys = ("dtype", "gradient_checkpointing", "schedule", "warmup_ratio", "max_grad_norm", "weight_decay")
        return {k: getattr(self, k) for k in keys if getattr(self, k) != Sweep.__dataclass_fields__[k].default}


@dataclass(frozen=True)
class Search:
    """Per-arm learning-rate search on the validation split (``[search]``)."""

    start: float = 2e-4
    """Centre of the first grid."""
    factor: float = 3.0
    """Multiplicative spacing of the grid (> 1)."""
    points: int = 3
    """First grid size per arm (odd)."""
    max_points: int = 9
    """Most rates tried per arm; the grid extends by one step while the best rate is at an edge."""
    select: str = "val_loss"
    """``"val_<metric>"`` for one of the task's metrics (its direction, min or max, comes from the task)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds the search trains (scores are means over them)."""

    def rate(self, index: int) -> float:
        """The grid's rate number ``index`` (0 = ``start``), rounded to 6 significant digits."""
        return float(f"{self.start * self.factor ** index:.6g}")

    def index(self, lr: float) -> int:
        """The grid index nearest to ``lr`` in log scale."""
        return round(math.log(lr / self.start) / math.log(self.factor))


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
    """This arm's own list of learning rates (overrides the sweep's list, search or transfer)."""
    adapter: str = "lora"
    """The adapter layer (``lowrank.list_adapters()``, e.g. ``"dora"``)."""
    adapter_options: dict[str, Any] = field(default_factory=dict)
    """The adapter's options (``LoRAConfig.adapter_options``, e.g. LoRA²'s ``target_rank``)."""
    optimizer: str = "adamw"
    """The preconditioned optimizer's base (``lowrank.optim.PreconditionedOptimizer(base=...)``: ``"adamw"``,
    ``"sgd"``, ...); ``"sgd"`` for preconditioners that make Adam-like directions themselves (LoFT)."""
    chain: str | None = None
    """A chain run beside the training (``lowrank.list_chains()``: ``"cola"``, ``"rac_lora"``, ``"xgblora"``); each
    run's record then says how many links ran (``links``)."""
    chain_options: dict[str, Any] = field(default_factory=dict)
    """The chain's options (``links``, ``link_steps``, ``init``, ...)."""
    ranks: list[int] | None = None
    """This arm's own ranks (overrides the sweep's ``ranks``; e.g. XGBLoRA's rank-1 boosters). Its verdict is
    against the reference arm at the reference's first rank when they differ."""
    search_start: float | None = None
    """Under a search: the centre of this arm's first grid (snapped to the ``[search]`` grid; default its
    ``start``). It saves runs; the grid still extends until the best rate is interior (or ``max_points``), so
    it changes the chosen rate only where the validation curve has more than one local optimum or the
    grid's budget runs out first."""

    def identity(self) -> dict[str, Any]:
        """What makes a run of this arm what it is (the rate mode and the search's start are not part of it;
        fields added later are left out at their default, so earlier results keep their keys)."""
        d = dataclasses.asdict(self)
        for k in ("lrs", "search_start"):
            d.pop(k)
        for k, default in (("adapter", "lora"), ("adapter_options", {}), ("optimizer", "adamw"), ("chain", None),
                           ("chain_options", {}), ("ranks", None)):
            if d[k] == default:
                d.pop(k)
        return d


@dataclass(frozen=True)
class AdaptiveSeeds:
    """``seeds = { adaptive = true, initial = [0, 1, 2], max = N, target_halfwidth = h }``: every arm runs the
    ``initial`` seeds; an arm whose comparison with the reference is undecided (its interval contains 0, or
    with ``equivalence_margin`` neither inside the margin nor outside 0) and wider than ``h`` (half-width, in
    the headline metric's units) gets one more seed (the next integer), and the reference with it, until it is
    decided, its half-width is at most ``h``, or it has ``max`` seeds."""

    initial: list[int]
    max: int
    target_halfwidth: float

    def seeds(self, n: int) -> list[int]:
        """The first ``n`` seeds: ``initial``, then the integers after its largest."""
        extra = n - len(self.initial)
        return list(self.initial[:n]) + [max(self.initial) + 1 + i for i in range(max(0, extra))]


def _adaptive(table, where: str) -> AdaptiveSeeds:
    keys = {"adaptive", "initial", "max", "target_halfwidth"}
    if not isinstance(table, dict) or table.get("adaptive") is not True or set(table) - keys:
        raise ValueError(f"{where}: seeds must be a list of integers or a table {{ adaptive = true, "
                         f"initial = [0, 1, 2], max = N, target_halfwidth = h }}, got {table!r}")
    initial = table.get("initial", [0, 1, 2])
    _check_int_list(where, "seeds.initial", initial, positive=False)
    n = table.get("max")
    _check(where, "seeds.max", n, lambda v: _is_int(v) and v >= len(initial),
           f"an integer >= the {len(initial)} initial seeds")
    _check(where, "seeds.target_halfwidth", table.get("target_halfwidth"), _is_rate,
           "a positive number (half the interval's width, in the headline metric's units)")
    return AdaptiveSeeds(list(initial), n, float(table["target_halfwidth"]))


@dataclass(frozen=True)
class Config:
    path: Path
    command: str
    sweep: Sweep
    task: dict[str, Any]
    arms: list[Arm]
    search: Search = field(default_factory=Search)
    has_search_table: bool = False
    plugins: tuple[str, ...] = ()
    adaptive: AdaptiveSeeds | None = None
    """Adaptive seeds (``seeds = { adaptive = true, ... }``); ``sweep.seeds`` is then its ``initial`` list."""

    def ranks_of(self, arm: Arm) -> list[int | None]:
        return [None] if arm.full_finetune else list(arm.ranks or self.sweep.ranks)

    def mode(self, arm: Arm) -> str:
        """``"list"``, ``"search"`` or ``"transfer"`` (the reference arm is searched under transfer)."""
        if arm.lrs is not None or not isinstance(self.sweep.lrs, str):
            return "list"
        if self.sweep.lrs == "transfer" and arm.name == self.sweep.reference:
            return "search"
        return self.sweep.lrs

    def listed_lrs(self, arm: Arm) -> list[float]:
        return list(arm.lrs if arm.lrs is not None else self.sweep.lrs)

    def spec(self, arm: Arm, rank: int | None, lr: float, seed: int, phase: str) -> RunSpec:
        """One run (a :class:`~lowrank_ablation.records.RunSpec`: a typed dict, one JSON object in the results). Its ``key`` identifies the run in a results file: it hashes what
        determines the training (not the phase, nor the sweep's name or rate mode), so a search run
        and a final run of the same arm, rank, rate and seed are one run, shared across configs."""
        spec = {"task": self.sweep.task, "task_options": self.task, "arm": arm.name, "arm_config": arm.identity(),
                "rank": rank, "lr": lr, "seed": seed, "steps": self.sweep.steps, "batch_size": self.sweep.batch_size,
                "alpha": self.sweep.alpha, "head_lr": self.sweep.head_lr, "eval_every": self.sweep.eval_every,
                **self.sweep.training()}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"sweep": self.sweep.name, **spec, "phase": phase, "key": key, "device": self.sweep.device}

    def runs(self) -> list[RunSpec]:
        """Every run of the arms with explicit rate lists (searched arms' runs depend on results:
        ``lowrank_ablation.search.plan_sweep``)."""
        return [self.spec(arm, rank, lr, seed, "final") for arm in self.arms if self.mode(arm) == "list"
                for rank in self.ranks_of(arm) for lr in self.listed_lrs(arm) for seed in self.sweep.seeds]

    @property
    def task_class(self):
        from .tasks import get_task

        return get_task(self.sweep.task)

    @property
    def metrics(self) -> dict[str, str]:
        """The task's metrics: name -> ``"min"`` or ``"max"``."""
        return dict(self.task_class.metrics)

    @property
    def headline(self) -> str:
        """The metric the tables and plots lead with (the task's)."""
        return self.task_class.headline

    def higher_is_better(self, metric: str) -> bool:
        return self.metrics[metric.removeprefix("val_").removeprefix("test_")] == "max"

    @property
    def select(self) -> str:
        """The validation metric that chooses rates (a list sweep without ``[search]``: the headline)."""
        if isinstance(self.sweep.lrs, str) or self.has_search_table:
            return self.search.select
        return f"val_{self.headline}"

    def title(self) -> str:
        """The task, its model and data, and the ranks (for plots)."""
        from .tasks import task_options

        what = self.task_class.describe(task_options(self.sweep.task, self.task))
        ranks = ", ".join(map(str, self.sweep.ranks))
        return f"{self.sweep.name}: {what}, r={ranks}"


COMMANDS = ("# lowrank ablate ", "# python -m lowrank_ablation ", "# python -m experiments.ablate ")
"""How a config's first line may begin (the console command; the module; the repository's alias)."""


def load(path: str | Path) -> Config:
    """Read and validate a sweep config; raises ``ValueError`` naming the field and the fix."""
    path = Path(path)
    text = path.read_text()
    first = text.splitlines()[0] if text else ""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    tables = ["plugins", "sweep", "task", "search", "arm"]
    unknown = sorted(set(raw) - set(tables))
    if unknown:
        raise ValueError(f"{path}: unknown table(s) or key(s) {unknown}; valid: {tables}")
    plugins = import_plugins(raw.get("plugins", []), path)
    if not (first.startswith(COMMANDS) or (plugins and first.startswith("# ") and first[2:].strip())):
        raise ValueError(f"{path}: the first line must be the command that runs it, e.g. '# lowrank ablate {path}'")
    table = raw.get("sweep", {})
    adaptive = None
    if isinstance(table, dict) and isinstance(table.get("seeds"), dict):
        adaptive = _adaptive(table["seeds"], f"{path} [sweep]")
        table = {**table, "seeds": adaptive.initial}
    sweep = _take(table, Sweep, f"{path} [sweep]")
    where = f"{path} [sweep]"
    from .tasks import get_task, task_options

    try:
        get_task(sweep.task)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for name in ("name", "results", "reference"):
        _check(where, name, getattr(sweep, name), lambda v: isinstance(v, str) and v, "a non-empty string")
    _check_sweep(sweep, where)
    task = raw.get("task", {})
    if not isinstance(task, dict):
        raise ValueError(f"{path} [task]: expected a table")
    try:
        task_options(sweep.task, task)
    except ValueError as exc:
        raise ValueError(f"{path} [task]: {exc}") from None
    search = _take(raw.get("search", {}), Search, f"{path} [search]")
    _check_search(search, f"{path} [search]", tuple(get_task(sweep.task).metrics))
    if "search" in raw and not isinstance(sweep.lrs, str):
        raise ValueError(f"{path}: a [search] table is only used with lrs = \"search\" or \"transfer\"; "
                         f"[sweep] lrs is the list {sweep.lrs}")
    arms = _arms(raw.get("arm", []), sweep, path)
    cfg = Config(path, first.lstrip("# ").strip(), sweep, task, arms, search, has_search_table="search" in raw,
                 plugins=plugins, adaptive=adaptive)
    if isinstance(sweep.lrs, str) or any(len(cfg.listed_lrs(a)) > 1 for a in arms if a.lrs is not None) \
            or (not isinstance(sweep.lrs, str) and len(sweep.lrs) > 1):  # rates are chosen: on a metric that exists
        try:
            get_task(sweep.task).check_select(cfg.select, task_options(sweep.task, task))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return cfg


def _check_sweep(sweep: Sweep, where: str) -> None:
    """Every ``[sweep]`` field's type and range (``name``/``results``/``reference`` are checked by the caller)."""
    _check_int_list(where, "seeds", sweep.seeds, positive=False)
    _check_int_list(where, "ranks", sweep.ranks, positive=True)
    if isinstance(sweep.lrs, str):
        _check(where, "lrs", sweep.lrs, lambda v: v in LR_MODES, f"a list of rates or one of {list(LR_MODES)}")
    else:
        _check(where, "lrs", sweep.lrs, lambda vs: isinstance(vs, list) and vs and all(_is_rate(v) for v in vs),
               f"a non-empty list of positive rates or one of {list(LR_MODES)}")
    for name in ("steps", "batch_size", "eval_every"):
        _check(where, name, getattr(sweep, name), lambda v: _is_int(v) and v > 0, "a positive integer")
    for name in ("alpha", "head_lr"):
        _check(where, name, getattr(sweep, name), _is_rate, "a positive finite number")
    _check(where, "dtype", sweep.dtype, lambda v: v in DTYPES, f"one of {list(DTYPES)}")
    _check(where, "device", sweep.device, lambda v: v in DEVICES, f"one of {list(DEVICES)}")
    _check(where, "gradient_checkpointing", sweep.gradient_checkpointing, lambda v: isinstance(v, bool), "true or false")
    _check(where, "schedule", sweep.schedule, lambda v: v in SCHEDULES, f"one of {list(SCHEDULES)}")
    _check(where, "warmup_ratio", sweep.warmup_ratio,
           lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)")
    if sweep.max_grad_norm is not None:
        _check(where, "max_grad_norm", sweep.max_grad_norm, _is_rate, "a positive finite number (or left out)")
    if sweep.weight_decay is not None:
        _check(where, "weight_decay", sweep.weight_decay,
               lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
               "a finite number >= 0 (or left out)")
    if sweep.equivalence_margin is not None:
        _check(where, "equivalence_margin", sweep.equivalence_margin, _is_rate,
               "a positive finite number (in the headline metric's units)")
    if sweep.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{where}: device = 'cuda' but no CUDA device is available here; use device = \"auto\" "
                             "(CUDA when present, else the CPU) or \"cpu\"")


def _arms(tables: Any, sweep: Sweep, path: Path) -> list[Arm]:
    """The ``[[arm]]`` tables as validated arms, their method names in registered spelling."""
    arms = [_take(a, Arm, f"{path} [[arm]] #{i + 1}") for i, a in enumerate(tables)]
    if not arms:
        raise ValueError(f"{path}: no [[arm]] tables; add at least one arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: arm names must be unique, got {names}")
    if sweep.reference not in names:
        raise ValueError(f"{path} [sweep]: reference arm {sweep.reference!r} is not one of the arms {names}"
                         + ("; lrs = \"transfer\" transfers the reference arm's searched rate to the others"
                            if sweep.lrs == "transfer" else ""))
    for a in arms:
        _check_arm(a, sweep, f"{path} arm {a.name!r}")
    # registered spellings ("LoRA_GA" is lora_ga), so that one method is one run key whatever its case
    arms = [a if a.full_finetune else dataclasses.replace(
        a, init=lowrank.registry.INITIALIZERS.canonical(a.init), adapter=lowrank.registry.ADAPTERS.canonical(a.adapter),
        preconditioner=lowrank.registry.PRECONDITIONERS.canonical(a.preconditioner)) for a in arms]
    if sweep.lrs == "transfer" and next(a for a in arms if a.name == sweep.reference).lrs is not None:
        raise ValueError(f"{path} arm {sweep.reference!r}: under lrs = \"transfer\" the reference arm's rate is "
                         "searched; remove its own lrs list")
    return arms


def import_plugins(modules: Any, path: Path) -> tuple[str, ...]:
    """Import each module named in a config's ``plugins`` list (the config's folder first on ``sys.path``);
    a module that does not import is a ``ValueError`` naming it, the error and the fix."""
    where = f"{path}: plugins"
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise ValueError(f"{where} must be a list of module names, e.g. plugins = [\"my_tasks\"], got {modules!r}")
    folder = str(Path(path).resolve().parent)
    if modules and folder not in sys.path:
        sys.path.insert(0, folder)  # kept: a plugin may import its own helpers later
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported the same way
            raise ValueError(f"{where}: module {m!r} does not import ({type(exc).__name__}: {exc}); put it in "
                             f"{folder} or on PYTHONPATH, or fix the error") from None
    return tuple(modules)


def _check_search(s: Search, where: str, metrics: tuple[str, ...]) -> None:
    _check(where, "start", s.start, _is_rate, "a positive finite rate")
    _check(where, "factor", s.factor, lambda v: _is_rate(v) and v > 1, "a number > 1 (the grid's spacing)")
    _check(where, "points", s.points, lambda v: _is_int(v) and v > 0 and v % 2 == 1,
           "an odd positive integer (the first grid is centred on start)")
    _check(where, "max_points", s.max_points, lambda v: _is_int(v) and v >= s.points,
           f"an integer >= points ({s.points})")
    selectable = [f"val_{m}" for m in metrics]
    if s.select not in selectable:
        raise ValueError(f"{where}: select = {s.select!r} is not a metric of this task; choose one of {selectable}")
    _check_int_list(where, "seeds", s.seeds, positive=False)


def _check_arm(a: Arm, sweep: Sweep, where: str) -> None:
    _check(where, "name", a.name, lambda v: isinstance(v, str) and v, "a non-empty string")
    _check(where, "full_finetune", a.full_finetune, lambda v: isinstance(v, bool), "true or false")
    if a.lrs is not None:
        _check(where, "lrs", a.lrs, lambda vs: isinstance(vs, list) and vs and all(_is_rate(v) for v in vs),
               "a non-empty list of positive rates")
    if a.search_start is not None:
        _check(where, "search_start", a.search_start, _is_rate, "a positive finite rate")
    if a.full_finetune:
        if a.chain is not None or a.ranks is not None:
            raise ValueError(f"{where}: chain / ranks with full_finetune: full fine-tuning has no adapters to chain or "
                             "rank; remove them")
        if a.optimizer != "adamw":
            raise ValueError(f"{where}: optimizer = {a.optimizer!r} with full_finetune: full fine-tuning trains with "
                             "AdamW; remove optimizer")
        return
    from lowrank.optim.optimizer import BASES

    _check(where, "optimizer", a.optimizer, lambda v: isinstance(v, str) and v.lower() in BASES,
           f"one of {sorted(BASES)} (the preconditioned optimizer's base)")
    for name in ("init_options", "preconditioner_options", "adapter_options"):
        _check(where, name, getattr(a, name), lambda v: isinstance(v, dict), "a table")
    try:  # validates init, its options, the adapter, scaling and alpha
        lowrank.LoRAConfig(rank=sweep.ranks[0], alpha=sweep.alpha, scaling=a.scaling, targets=["x"], init=a.init,
                           init_options=a.init_options, adapter=a.adapter, adapter_options=a.adapter_options)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    try:
        lowrank.get_preconditioner(a.preconditioner)(**a.preconditioner_options)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if a.ranks is not None:
        _check_int_list(where, "ranks", a.ranks, positive=True)
    if a.chain is None:
        if a.chain_options:
            raise ValueError(f"{where}: chain_options without a chain; set chain = one of {lowrank.list_chains()}")
        return
    _check(where, "chain_options", a.chain_options, lambda v: isinstance(v, dict), "a table")
    try:  # the chain, its options and its knots over the sweep's steps
        lowrank.get_chain(a.chain)(**a.chain_options).knots(sweep.steps)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
