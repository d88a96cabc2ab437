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
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from .._options import build_options
from ..adapters.base import InitResult  # noqa: F401 - the adapter's input contract, re-exported
from ..weights import weight_shape, weight_view

if TYPE_CHECKING:
    from .budget import RankBudget


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
        """A statistic collected by the initializer's :meth:`lowrank.init.DataInitializer.collect` for this layer."""
        if key not in self._stats:
            raise KeyError(f"layer {self.name!r} has no statistic {key!r}; the initializer's collect() must "
                           f"provide it (available: {sorted(self._stats)})")
        return self._stats[key]

    def gradient(self) -> torch.Tensor:
        """The estimated mean gradient ``G = dL/dW`` at initialization, float32 ``(d_out, d_in)``."""
        return self.stat("gradient")

    def gradient_svd(self, k: int, **svd_options: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top ``k`` singular triplets of ``G``: ``U (m, k)``, ``S (k,)`` descending, ``V (n, k)``. From the
        sketched estimate when the pass made one (``estimator="sketch"``), else the SVD of ``ctx.gradient()``
        (``svd_options``: those of ``lowrank.init.svd.top_svd``)."""
        if "gradient_svd" in self._stats:
            U, S, V = self._stats["gradient_svd"]
            if U.shape[1] < k:
                raise ValueError(f"layer {self.name!r}: the sketch holds {U.shape[1]} singular triplets of G, {k} "
                                 "are needed")
            return U[:, :k].to(self.device), S[:k].to(self.device), V[:, :k].to(self.device)
        from .svd import top_svd

        return top_svd(self.gradient(), k, **svd_options)

    def covariance(self) -> torch.Tensor:
        """The layer-input second moment ``C = X^T X / N``, float32 ``(d_in, d_in)`` (need ``"covariance"``)."""
        return self.stat("covariance")

    def input_svd(self, *, centred: bool = False, k: int | None = None,
                  vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(S (k,), V (d_in, k))``: the top ``k`` (default all) singular values (descending) and right-singular
        vectors of the layer's input rows ``X``, centred or not; ``vectors=False``: ``(S, None)``, cheaper
        (need ``"input_svd"``; see ``lowrank.init.collect.input_svd``)."""
        from .collect import input_svd

        return input_svd({key: self.stat(key) for key in ("covariance", "input_mean", "rows")}, centred=centred,
                         k=k, vectors=vectors)


class Initializer(ABC):
    """Base class of initialization methods. Subclass, declare ``Options``, implement ``init_layer``."""

    @dataclass(frozen=True)
    class Options:
        """No options."""

    offset: ClassVar[bool | None] = None
    """Whether ``init_layer`` returns ``offset=True`` (the base becomes ``W0 - s B A``) for every layer: declared,
    ``inject`` refuses tied weights before the data pass, and a result that disagrees is an error; ``None``
    (the default): it depends on the layer or the options, and is checked from the results."""
    preserves_output: ClassVar[bool] = True
    """False for methods whose init is itself a step (LoRA-One): output changes at step 0."""
    uses_data: ClassVar[bool] = False
    """True for data-driven methods: :func:`lowrank.inject` must get ``data`` (and maybe ``loss_fn``). The data
    protocol is ``lowrank.init.DataInitializer`` (declared ``needs``, its ``collect``), which sets this."""
    def quantization(self) -> dict[str, Any] | None:
        """The 4-bit settings the base must be quantized with for this initialization to hold
        (``quant_type``, ``blocksize``, ``compress_statistics``: LoftQ's), read by :func:`lowrank.quantize_base`;
        ``None`` (the default): no requirement."""
        return None

    frozen: ClassVar[tuple[str, ...]] = ()
    """Adapter parameters kept as initialized during training (MiCA: ``("B",)``): ``inject`` and ``load_adapter``
    turn their ``requires_grad`` off, and :class:`lowrank.optim.PreconditionedOptimizer` leaves them out."""
    registry_name: ClassVar[str] = "?"
    adapter_kinds: ClassVar[tuple[str, ...]] = ("factors",)
    """Adapter kinds it can initialize (``Adapter.kind``): a pairing outside them is a config error."""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if vars(cls).get("supports_budget") and not issubclass(cls, RankAllocation):
            raise TypeError(f"initializer {cls.__name__} sets supports_budget = True; rank allocation is now a protocol "
                            "of its own: derive from lowrank.init.RankAllocation (and implement allocate) instead")
        if (vars(cls).get("needs") or cls.uses_data) and not callable(getattr(cls, "collect", None)):
            raise TypeError(f"initializer {cls.__name__} declares data needs but has no collect(); data-driven "
                            "initializers derive from lowrank.init.DataInitializer (declare needs = (...)), or "
                            "implement collect(model, modules, data, loss_fn, *, ranks) for a pass of their own")

    def __init__(self, **options: Any):
        self.options = build_options(self.Options, options, "initializer", self.registry_name)

    def check_layer(self, ctx: LayerContext) -> None:
        """Raise ``ValueError`` (naming the layer, the value and the fix) if ``ctx`` cannot be initialized."""

    @abstractmethod
    def init_layer(self, ctx: LayerContext) -> InitResult:
        """Return ``A (r, d_in)``, ``B (d_out, r)`` (float32 is fine) and whether to offset the base."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class RankAllocation:
    """The protocol of initializers that choose per-layer ranks (under ``LoRAConfig(rank_budget=...)``, or by their
    own options, e.g. EVA with ``rho > 1``): derive from it beside :class:`Initializer` and implement
    :meth:`allocate`; the bounds and the alpha rule have defaults."""

    def allocates(self) -> bool:
        """Whether this initializer (with these options) chooses per-layer ranks even without a
        ``rank_budget`` (then the budget is the config's ranks summed over the targets), e.g. EVA with ``rho > 1``."""
        return False

    def max_rank(self, ctx: LayerContext) -> int:
        """The largest rank an allocation may give the layer (``ctx.rank`` is the config's rank for it)."""
        return min(ctx.m, ctx.n)

    def min_rank(self, ctx: LayerContext) -> int:
        """The smallest rank an allocation may give the layer (with ``LoRAConfig.rank_min``, the larger wins)."""
        return 1

    def default_budget(self, ranks: Sequence[int]) -> int:
        """The budget when the config gives no ``rank_budget`` (``ranks``: the config's rank of every target);
        default their sum."""
        return sum(ranks)

    def check_budget(self, budget: "RankBudget") -> None:
        """Raise ``ValueError`` (naming the value and the fix) when the budget's bounds or total do not suit the
        method; called before the data pass. Default: nothing to check."""

    def scale_alpha(self, alpha: float, rank: int, allocated: int) -> float:
        """The alpha of a layer allocated rank ``allocated`` instead of the config's ``rank`` (default: unchanged)."""
        return alpha

    def allocate(self, contexts: Sequence[LayerContext], budget: "RankBudget") -> dict[str, int]:
        """Per-layer ranks summing to ``budget.total`` within each layer's bounds, from the collected
        statistics (``contexts[i].stat(...)``; ``contexts[i].rank`` is the config's rank); helpers in
        ``lowrank.init.budget``."""
        raise NotImplementedError(f"{type(self).__name__} derives from RankAllocation but does not implement "
                                  "allocate")
