"""``LoRAConfig``: what to adapt, with which rank, scaling and initializer. Validated on creation."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

SCALINGS = ("standard", "rslora")


def output_scale(alpha: float, rank: int, scaling: str) -> float:
    """The adapter's output scale ``s``: ``alpha / r`` (``"standard"``) or ``alpha / sqrt(r)`` (``"rslora"``,
    Kalajdzievski 2023, arXiv 2312.03732). The one place the rule is written."""
    if scaling not in SCALINGS:
        raise ValueError(f"invalid scaling={scaling!r}: must be one of {SCALINGS}")
    return alpha / rank if scaling == "standard" else alpha / math.sqrt(rank)


def _pattern_matches(key: str, name: str, *, literal: bool) -> bool:
    """``key`` matches the dotted module path ``name`` in full or as a dotted suffix.

    ``literal=False`` treats ``key`` as a regex (``"layer\\.[0-3]\\..*query"``); with ``literal=True``
    it is a plain module name (``"query"``, ``"attention.self.query"``).
    """
    body = re.escape(key) if literal else f"(?:{key})"
    return re.fullmatch(rf"(?:.*\.)?{body}", name) is not None


def matches_targets(targets: str | Sequence[str], name: str) -> bool:
    """A string is one regex; a list holds module names. Both match the full path or a suffix of it."""
    if isinstance(targets, str):
        return _pattern_matches(targets, name, literal=False)
    return any(_pattern_matches(t, name, literal=True) for t in targets)


def lookup_pattern(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """The value of the first key of ``pattern`` (a regex, full path or suffix) that matches ``name``."""
    for key, value in pattern.items():
        if _pattern_matches(key, name, literal=False):
            return value
    return default


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Configuration of a LoRA injection.

    ``s`` below is the adapter's output scale: ``y = W x + s * B (A x)``.
    """

    targets: str | tuple[str, ...]
    """Modules to adapt: a list of module names or one regex, matched against the full dotted
    path or a dotted suffix of it (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``)."""
    rank: int = 8
    """``r``, the inner dimension of ``B (d_out, r)`` and ``A (r, d_in)``."""
    alpha: float = 16.0
    """Numerator of the scale ``s``."""
    scaling: str = "standard"
    """``"standard"``: ``s = alpha / r``; ``"rslora"``: ``s = alpha / sqrt(r)`` (Kalajdzievski 2023)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (``B A dropout(x)``), in ``[0, 1)``."""
    init: str = "kaiming"
    """Registered initializer name (``lowrank.list_initializers()``)."""
    init_options: dict[str, Any] = field(default_factory=dict)
    """Options of the initializer; unknown keys are an error that lists the valid ones."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-layer rank overrides: ``{regex or name: rank}``, first matching key wins."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-layer alpha overrides, same matching as ``rank_pattern``."""
    trainable: tuple[str, ...] = ()
    """Extra modules trained in full (e.g. a new classifier head), matched like list ``targets``."""
    seed: int = 0
    """Seed of the per-layer generators of random initializers (the global RNG is never touched)."""
    adapter: str = "lora"
    """Registered adapter layer (``lowrank.list_adapters()``)."""
    adapter_options: dict[str, Any] = field(default_factory=dict)
    """Options of the adapter layer (its ``Options``); unknown keys are an error that lists the valid ones."""
    rank_budget: int | None = None
    """Total rank summed over the target layers, allocated per layer by an initializer that supports it
    (EVA, GoRA) from its statistics. ``None``: fixed ranks, except for an initializer that always allocates
    (EVA with ``rho > 1``), whose budget is then ``rank`` (and ``rank_pattern``) summed over the targets."""
    rank_min: int | None = None
    """Smallest rank an allocation may give a layer (``None``: the method's own minimum, 1 for EVA and GoRA's
    rules, 0 for HeteroLoRA); 0 lets it leave a layer without an adapter (the layer stays the plain base module;
    save, load, merge and the PEFT export cover the adapted ones only)."""
    rank_max: int | None = None
    """Largest rank an allocation may give a layer (``None``: what the method and the layer's shape allow)."""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if isinstance(self.targets, str):
            _check_regex("targets", self.targets)
        elif isinstance(self.targets, Sequence) and self.targets and all(isinstance(t, str) and t for t in self.targets):
            set_("targets", tuple(self.targets))
        else:
            raise ValueError(f"invalid targets={self.targets!r}: give a non-empty list of module names or one regex string")
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        if self.scaling not in SCALINGS:
            raise ValueError(f"invalid scaling={self.scaling!r}: must be one of {SCALINGS}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"invalid dropout={self.dropout!r}: must be in [0, 1)")
        for name, pattern, check in (("rank_pattern", self.rank_pattern, _check_rank),
                                     ("alpha_pattern", self.alpha_pattern, _check_alpha)):
            if not isinstance(pattern, Mapping):
                raise ValueError(f"invalid {name}={pattern!r}: must be a dict {{module regex: value}}")
            for key, value in pattern.items():
                _check_regex(f"{name} key", key)
                check(f"{name}[{key!r}]", value)
            set_(name, dict(pattern))
        if isinstance(self.trainable, str):
            set_("trainable", (self.trainable,))
        set_("trainable", tuple(self.trainable))
        if not all(isinstance(t, str) and t for t in self.trainable):
            raise ValueError(f"invalid trainable={self.trainable!r}: must be a list of module names")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"invalid seed={self.seed!r}: must be an int")
        if not isinstance(self.init_options, Mapping):
            raise ValueError(f"invalid init_options={self.init_options!r}: must be a dict")
        set_("init_options", dict(self.init_options))
        if not isinstance(self.adapter_options, Mapping):
            raise ValueError(f"invalid adapter_options={self.adapter_options!r}: must be a dict")
        set_("adapter_options", dict(self.adapter_options))
        initializer = self._check_methods()  # unknown names and options fail here, before any model is touched
        from .registry import INITIALIZERS

        can = INITIALIZERS.entry(self.init).capabilities["allocates_ranks"]  # derives from init.RankAllocation
        set_("_allocates", self.rank_budget is not None or (can and initializer.allocates()))

    def _check_methods(self):
        """The initializer and adapter exist and fit each other (names stored as registered), the options, the
        rank budget and the rank bounds are valid; returns an initializer instance built
        from the options (to check them; each call that initializes builds its own)."""
        from .registry import ADAPTERS, INITIALIZERS, get_adapter, get_initializer

        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        adapter = get_adapter(self.adapter)
        init = get_initializer(self.init)
        set_("init", INITIALIZERS.canonical(self.init))  # "LoRA_GA" is stored as "lora_ga"
        set_("adapter", ADAPTERS.canonical(self.adapter))
        if adapter.kind not in init.adapter_kinds:
            fits = [n for n in ADAPTERS.list() if ADAPTERS.get(n).kind in init.adapter_kinds]
            own = INITIALIZERS.list(adapter_kind=adapter.kind)
            raise ValueError(f"initializer {self.init!r} does not support adapter {self.adapter!r} (a {adapter.kind!r} "
                             f"adapter); it initializes {fits}. Choose one of those adapters, or an initializer of "
                             f"{self.adapter!r}: {own}")
        initializer = init(**self.init_options)
        self.make_adapter_options()  # unknown or mistyped adapter options fail here too
        if self.rank_budget is not None:
            _check_rank("rank_budget", self.rank_budget)
            if not INITIALIZERS.entry(self.init).capabilities["allocates_ranks"]:
                fits = INITIALIZERS.list(allocates_ranks=True)
                raise ValueError(f"initializer {self.init!r} cannot allocate ranks under rank_budget={self.rank_budget}; "
                                 f"use one that can ({fits}) or drop rank_budget for fixed ranks")
        if self.rank_min is not None and (not isinstance(self.rank_min, int) or isinstance(self.rank_min, bool)
                                          or self.rank_min < 0):
            raise ValueError(f"invalid rank_min={self.rank_min!r}: must be an int >= 0 or None (0: an allocating "
                             "initializer may leave a layer without an adapter, e.g. heterolora)")
        if self.rank_max is not None:
            _check_rank("rank_max", self.rank_max)
            if self.rank_min is not None and self.rank_max < self.rank_min:
                raise ValueError(f"invalid rank_max={self.rank_max} < rank_min={self.rank_min}")
        return initializer

    # -- per-layer values ---------------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        return int(lookup_pattern(self.rank_pattern, name, self.rank))

    def alpha_for(self, name: str, rank: int | None = None, initializer: Any = None) -> float:
        """The layer's alpha; at an allocated ``rank`` other than the config's, as ``initializer`` (the call's
        instance; ``None``: one built from this config) adjusts it (``RankAllocation.scale_alpha``; EVA keeps
        ``alpha / r`` fixed)."""
        alpha = float(lookup_pattern(self.alpha_pattern, name, self.alpha))
        if rank is not None and rank != self.rank_for(name):
            initializer = initializer if initializer is not None else self.make_initializer()
            alpha = float(initializer.scale_alpha(alpha, self.rank_for(name), rank))
        return alpha

    def scaling_for(self, name: str, rank: int | None = None, initializer: Any = None) -> float:
        """:func:`output_scale` for the layer ``name`` (at ``rank``, default the config's rank for it)."""
        r = self.rank_for(name) if rank is None else rank
        return output_scale(self.alpha_for(name, rank, initializer), r, self.scaling)

    @property
    def allocates_ranks(self) -> bool:
        """Whether the initializer chooses per-layer ranks (``rank_budget`` set, or it always allocates)."""
        return self._allocates  # type: ignore[attr-defined]

    def allocation(self, names: Sequence[str], initializer: Any):
        """The driver's :class:`~lowrank.init.driver.Allocation` for these target layers (alphas at allocated ranks
        as ``initializer``, the call's instance, adjusts them), or ``None``."""
        if not self.allocates_ranks:
            return None
        from .init.driver import Allocation

        total = self.rank_budget if self.rank_budget is not None else initializer.default_budget(
            [self.rank_for(n) for n in names])
        return Allocation(total, self.rank_min, self.rank_max, alpha=lambda n, r: self.alpha_for(n, r, initializer),
                          scaling=lambda n, r: self.scaling_for(n, r, initializer))

    def make_adapter_options(self):
        """The adapter's ``Options`` built from ``adapter_options`` (checked as ``init_options`` are)."""
        from ._options import build_options
        from .registry import get_adapter

        return build_options(get_adapter(self.adapter).Options, self.adapter_options, "adapter", self.adapter)

    def make_initializer(self):
        """A new initializer instance from ``init`` and ``init_options`` (:func:`lowrank.plan.plan` builds one per
        call)."""
        from .registry import get_initializer

        return get_initializer(self.init)(**self.init_options)

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        d["trainable"] = list(self.trainable)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown LoRAConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "LoRAConfig":
        return dataclasses.replace(self, **changes)


def _check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"invalid {name}={value!r}: must be a positive int")


def _check_alpha(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid {name}={value!r}: must be a finite number > 0")


def _check_regex(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid {name} {value!r}: not a valid regex ({exc})") from None


PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "target_modules": "targets", "lora_dropout": "dropout",
              "modules_to_save": "trainable", "init_lora_weights": "init", "use_rslora": "scaling='rslora'",
              "use_dora": "adapter='dora'", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}
"""PEFT ``LoraConfig`` argument -> the ``LoRAConfig`` field (or setting) that means the same."""


def _with_suggestions(init):
    """``LoRAConfig(r=8, target_modules=[...])`` (PEFT's names) gets "did you mean rank / targets" instead of
    a bare ``unexpected keyword argument``."""
    import difflib
    import functools

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        valid = {f.name for f in dataclasses.fields(LoRAConfig)}
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            hints = []
            for k in unknown:
                close = PEFT_NAMES.get(k) or next(iter(difflib.get_close_matches(k, sorted(valid), n=1)), None)
                hints.append(f"{k!r} (did you mean {close}?)" if close else repr(k))
            raise TypeError(f"LoRAConfig got unknown argument(s) {', '.join(hints)}; its fields are {sorted(valid)}")
        init(self, *args, **kwargs)
    return __init__


LoRAConfig.__init__ = _with_suggestions(LoRAConfig.__init__)
