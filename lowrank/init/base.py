"""``Initializer``: the extension point for LoRA initialization methods.

An initializer is short math. It receives a :class:`LayerContext` (the layer's shape, rank,
scale, its base weight in float32 as ``(d_out, d_in)``, a seeded generator and, for
data-driven methods, statistics such as the estimated gradient) and returns an
:class:`InitResult`: ``A (r, d_in)``, ``B (d_out, r)`` and whether the base must be offset,
``W = W0 - s B A``, so the model's output is unchanged. The framework does the rest: dtype
casts, storage layout (``Conv1D``), the offset, rollback on failure and bookkeeping.

Adding a method::

    @lowrank.register_initializer("my_init")
    class MyInit(lowrank.Initializer):
        \"\"\"One line that ``list_initializers`` shows.\"\"\"

        @dataclass(frozen=True)
        class Options:
            std: float = 0.01

        def init_layer(self, ctx):
            A = self.options.std * ctx.randn(ctx.rank, ctx.n)
            return lowrank.InitResult(A=A, B=ctx.zeros(ctx.m, ctx.rank))
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from .._options import build_options
from ..adapters.base import weight_shape, weight_view


@dataclass
class InitResult:
    """What an initializer returns for one layer."""

    A: torch.Tensor
    """``(r, d_in)``."""
    B: torch.Tensor
    """``(d_out, r)``."""
    offset: bool = False
    """Set the base weight to ``W0 - s B A`` so the output is unchanged at step 0."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further tensors for adapters that have them (LoRA-XS's core ``R (r, r)``)."""


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends only on the config seed and the layer's dotted name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LayerContext:
    """Everything an initializer may need for one layer, computed lazily."""

    def __init__(self, name: str, module: nn.Module, *, rank: int, alpha: float, scaling: float, seed: int = 0,
                 stats: Mapping[str, Any] | None = None):
        self.name, self.module, self.seed = name, module, seed
        self.rank, self.alpha, self.scaling = rank, alpha, scaling
        self.m, self.n = weight_shape(module)  # (d_out, d_in)
        self._stats = dict(stats or {})

    @property
    def rslora(self) -> bool:
        """Whether the scale is rsLoRA's ``alpha / sqrt(r)`` (for ``r = 1`` both conventions agree)."""
        return self.rank == 1 or math.isclose(self.scaling, self.alpha / math.sqrt(self.rank))

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @cached_property
    def weight(self) -> torch.Tensor:
        """The base weight ``W0`` in float32 (float64 if stored so) as ``(d_out, d_in)`` (a copy)."""
        w = weight_view(self.module).detach()
        return w.to(torch.promote_types(w.dtype, torch.float32), copy=True)

    @cached_property
    def generator(self) -> torch.Generator:
        """A CPU generator seeded from ``(seed, layer name)``; the global RNG is never used."""
        return torch.Generator(device="cpu").manual_seed(layer_seed(self.seed, self.name))

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal float32 samples from :attr:`generator`, on the layer's device."""
        return torch.randn(*shape, generator=self.generator).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform ``[0, 1)`` float32 samples from :attr:`generator`, on the layer's device."""
        return torch.rand(*shape, generator=self.generator).to(self.device)

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.device)

    def stat(self, key: str) -> Any:
        """A statistic collected by the initializer's :meth:`Initializer.collect` for this layer."""
        if key not in self._stats:
            raise KeyError(f"layer {self.name!r} has no statistic {key!r}; the initializer's collect() must "
                           f"provide it (available: {sorted(self._stats)})")
        return self._stats[key]

    def gradient(self) -> torch.Tensor:
        """The estimated mean gradient ``G = dL/dW`` at initialization, float32 ``(d_out, d_in)``."""
        return self.stat("gradient")


class Initializer(ABC):
    """Base class of initialization methods. Subclass, declare ``Options``, implement ``init_layer``."""

    @dataclass(frozen=True)
    class Options:
        """No options."""

    preserves_output: ClassVar[bool] = True
    """False for methods whose init is itself a step (LoRA-One): output changes at step 0."""
    uses_data: ClassVar[bool] = False
    """True for data-driven methods: :func:`lowrank.inject` must get ``data`` (and maybe ``loss_fn``)."""
    registry_name: ClassVar[str] = "?"
    adapter_kinds: ClassVar[tuple[str, ...]] = ("factors",)
    """Adapter kinds it can initialize (``Adapter.kind``): a pairing outside them is a config error."""

    def __init__(self, **options: Any):
        self.options = build_options(self.Options, options, "initializer", self.registry_name)

    def check_layer(self, ctx: LayerContext) -> None:
        """Raise ``ValueError`` (naming the layer, the value and the fix) if ``ctx`` cannot be initialized."""

    def collect(self, model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable | None,
                loss_fn: Callable | None) -> dict[str, dict[str, Any]]:
        """Data-driven methods: return per-layer statistics (``{name: {"gradient": G}}``) from ``data``.

        Runs on the model before any change. Must leave the model as it found it.
        """
        return {}

    @abstractmethod
    def init_layer(self, ctx: LayerContext) -> InitResult:
        """Return ``A (r, d_in)``, ``B (d_out, r)`` (float32 is fine) and whether to offset the base."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
