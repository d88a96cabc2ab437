"""A run as the runner passes it around, typed: :class:`RunSpec` (what a config plans: ``Config.spec``) and
:class:`RunRecord` (the spec plus what the finished run measured: ``run.train_one``), one JSON line per record in
a results file. They are ``TypedDict`` s, so the file format is the plain JSON it always was; :func:`problems`
checks a line read back against these declarations (the fields a record must have, and the type of every field
it has), and ``run.read_records`` skips and counts a line that fails."""

from __future__ import annotations

import functools
import types
import typing
from typing import Any, TypedDict, Union


class _SpecCore(TypedDict):
    key: str
    """Hash of what determines the training (``Config.spec``): one run, whichever phase or sweep planned it."""
    arm: str
    rank: Union[int, None]
    """``None`` for full fine-tuning."""
    lr: float
    seed: int


class RunSpec(_SpecCore, total=False):
    """One planned run (``Config.spec``)."""

    sweep: str
    task: str
    task_options: dict[str, Any]
    arm_config: dict[str, Any]
    """``Arm.identity()``: the initializer, adapter, preconditioner, chain and their options."""
    steps: int
    batch_size: int
    alpha: float
    head_lr: float
    eval_every: int
    phase: str
    """``"search"`` or ``"final"``."""
    device: str
    # the training settings a run carries only when they differ from the defaults (``Sweep.training``)
    dtype: str
    gradient_checkpointing: bool
    schedule: str
    warmup_ratio: float
    max_grad_norm: float
    weight_decay: float


class _RecordCore(TypedDict):
    status: str
    """``"ok"`` or ``"diverged"``."""
    loss_curve: list[float]
    val: dict[str, Union[float, None]]
    test: dict[str, Union[float, None]]


class RunRecord(RunSpec, _RecordCore, total=False):
    """One finished run: its spec and what it measured."""

    eval: list[dict[str, Union[float, None]]]
    """The validation metrics at step 0 and every ``eval_every`` steps (with ``"step"``)."""
    wall_time_s: float
    peak_memory_bytes: int
    world_size: int
    lowrank_version: str
    torch_version: str
    intruders: Union[dict[str, Any], None]
    links: int
    """How many links a chain ran (COLA, RAC-LoRA, XGBLoRA)."""
    test_outcomes: dict[str, dict[str, Any]]
    """Per-example test outcomes, compact (``outcomes.encode``)."""


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is float:  # JSON writes 2.0 as 2.0 but a config's alpha = 16 stays an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(a, k) and _matches(b, v) for a, b in value.items())
    return isinstance(value, hint)


@functools.lru_cache(maxsize=None)
def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def problems(obj: Any, kind: type = RunRecord) -> list[str]:
    """What keeps ``obj`` from being a ``kind`` (a missing required field, a field of the wrong type); ``[]`` when
    it is one. Fields a ``kind`` does not declare are allowed (a newer runner's)."""
    if not isinstance(obj, dict):
        return [f"not a JSON object: {type(obj).__name__}"]
    hints = _hints(kind)
    out = [f"missing {k!r}" for k in sorted(kind.__required_keys__) if k not in obj]
    out += [f"{k!r} = {obj[k]!r:.60} is not {hints[k]}" for k in hints if k in obj and not _matches(obj[k], hints[k])]
    return out
