"""The one initialization driver: every path that runs an initializer (``lowrank.inject``,
``lowrank.load_adapter``'s rebuild, ``lowrank.peft.initialize``, ``lowrank.theory``) goes through
:func:`run_initializer`, so they cannot drift apart.

It checks every layer (``Initializer.check_layer``), collects the statistics a data-driven method
needs in one pass (float32 sums, the true mean over batches, all-reduced under torch.distributed),
runs ``init_layer`` per layer, checks each result (shapes, finite values). Under torch.distributed
each layer's ``init_layer`` (its SVD) runs on one rank, chosen to balance the work, and the factors
are broadcast from it, so they are bitwise identical on every rank and the SVD time falls with the
number of ranks.
It changes no weight: committing the results (adapter layers, offsets, rollback) is
:func:`lowrank.plan.commit`'s job, with :func:`lowrank.weights.offset_weight` as the one formula for
``W = W0 - s B A``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist_helpers
from ..weights import weight_shape
from ..sharding import is_dtensor
from .base import InitResult, Initializer, LayerContext, RankAllocation
from .budget import RankBudget


@dataclass(frozen=True)
class LayerSpec:
    """One layer to initialize: its module and resolved hyper-parameters."""

    name: str
    module: nn.Module
    rank: int
    alpha: float
    scaling: float


def context(spec: LayerSpec, seed: int, stats: Mapping[str, Any] | None = None) -> LayerContext:
    return LayerContext(spec.name, spec.module, rank=spec.rank, alpha=spec.alpha, scaling=spec.scaling, seed=seed,
                        stats=stats)


def check_result(res: InitResult, spec: LayerSpec, init_name: str, offset: bool | None = None) -> None:
    """Shapes, finite values, and (``offset`` not ``None``) the offset the initializer declared."""
    m, n = weight_shape(spec.module)
    if not isinstance(res, InitResult):
        raise TypeError(f"initializer {init_name!r} returned {type(res).__name__} for layer {spec.name!r}; "
                        "init_layer must return a lowrank.InitResult")
    if offset is not None and bool(res.offset) != offset:
        raise ValueError(f"initializer {init_name!r} declares offset={offset} but returned offset={res.offset} for "
                         f"layer {spec.name!r}; make Initializer.offset match what init_layer returns (or set it to "
                         "None if it depends on the layer)")
    for key, want in (("A", (spec.rank, n)), ("B", (m, spec.rank))):
        got = getattr(res, key)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"initializer {init_name!r} returned {key} of shape {shape} for layer {spec.name!r}; "
                             f"expected {want}")
    if res.offset_factors is not None:
        if not res.offset or len(res.offset_factors) != 2 or any(
                not isinstance(t, torch.Tensor) or t.shape != f.shape for t, f in zip(res.offset_factors, (res.A, res.B))):
            raise ValueError(f"initializer {init_name!r} returned offset_factors for layer {spec.name!r} that are not "
                             f"an (A0, B0) pair shaped like (A, B) with offset=True")
    for key, got in [("A", res.A), ("B", res.B), *res.extras.items(),
                     *zip(("A0", "B0"), res.offset_factors or ())]:
        if not torch.isfinite(got).all():
            raise FloatingPointError(f"initializer {init_name!r} returned non-finite values in {key} for layer "
                                     f"{spec.name!r}")


def compact(res: InitResult) -> InitResult:
    """``res`` with every tensor that is a view into a larger storage copied out: a slice such as
    ``Q[:, :r]`` of a full factorization would otherwise keep the whole ``Q`` (the size of the weight)
    alive until the last layer is committed, for every layer."""
    def own(t: torch.Tensor) -> torch.Tensor:
        return t.clone(memory_format=torch.contiguous_format) if (
            t.untyped_storage().nbytes() > t.numel() * t.element_size() or not t.is_contiguous()) else t

    res.A, res.B = own(res.A), own(res.B)
    res.extras = {k: own(t) for k, t in res.extras.items()}
    if res.offset_factors is not None:
        res.offset_factors = (own(res.offset_factors[0]), own(res.offset_factors[1]))
    return res


@dataclass(frozen=True)
class Allocation:
    """Ask the driver to let the initializer choose per-layer ranks (``Initializer.allocate``)."""

    total: int
    """The rank budget: the sum of the allocated ranks."""
    rank_min: int | None = None
    """``None``: each layer's minimum is the initializer's (``RankAllocation.min_rank``)."""
    rank_max: int | None = None
    alpha: Callable[[str, int], float] | None = None
    """``alpha(layer name, rank)``: the layer's alpha at an allocated rank (``None``: unchanged)."""
    scaling: Callable[[str, int], float] | None = None
    """``scaling(layer name, rank)``: the layer's scale ``s`` at an allocated rank (the config's rule)."""

    def budget(self, initializer: RankAllocation, layers: Sequence[LayerSpec], seed: int) -> RankBudget:
        ctxs = {s.name: context(s, seed) for s in layers}
        lo = {n: max(self.rank_min or 0, initializer.min_rank(c)) for n, c in ctxs.items()}
        hi = {n: min(initializer.max_rank(c), self.rank_max or initializer.max_rank(c)) for n, c in ctxs.items()}
        return RankBudget(self.total, lo, hi)


def run_initializer(initializer: Initializer, layers: Sequence[LayerSpec], **kwargs: Any) -> list[InitResult]:
    """``InitResult`` per layer, checked (:func:`initialize_layers` without the final layer records): the one
    call for paths that are not ``inject`` (``peft.initialize``, ``theory``)."""
    return initialize_layers(initializer, layers, **kwargs)[1]


def check_layers(initializer: Initializer, layers: Sequence[LayerSpec], seed: int,
                 allocation: Allocation | None = None) -> RankBudget | None:
    """Everything about the layers that can be checked before the data pass: each layer
    (``Initializer.check_layer``) and, with ``allocation``, the budget's per-layer bounds; returns the budget."""
    for spec in layers:
        initializer.check_layer(context(spec, seed))
    if allocation is None:
        return None
    if not isinstance(initializer, RankAllocation):
        raise ValueError(f"initializer {initializer.registry_name!r} cannot allocate ranks under a budget; drop "
                         "rank_budget or use one that can (EVA, GoRA)")
    budget = allocation.budget(initializer, layers, seed)
    initializer.check_budget(budget)
    return budget


def collect_layers(initializer: Initializer, layers: Sequence[LayerSpec], *, model: nn.Module | None,
                   data: Iterable | None, loss_fn: Callable | None) -> dict[str, dict[str, Any]]:
    """The data pass of a data-driven initializer (``DataInitializer.collect``), ``{}`` for the others; under
    torch.distributed the ranks first check they hold the same layers."""
    name = initializer.registry_name
    if not initializer.uses_data:
        return {}
    if data is None:
        raise ValueError(f"initializer {name!r} is data-driven: pass data=<iterable of batches> (and "
                         "loss_fn=lambda model, batch: <scalar loss> if model(**batch).loss is not your loss)")
    if getattr(initializer.options, "distributed", False) and dist_helpers.active():
        dist_helpers.check_same([(s.name, tuple(weight_shape(s.module)), s.rank) for s in layers] + [name],
                                f"data-parallel {name!r} init")
    return initializer.collect(model, {s.name: s.module for s in layers}, data, loss_fn,
                               ranks={s.name: s.rank for s in layers})


def init_layers(initializer: Initializer, layers: Sequence[LayerSpec], stats: Mapping[str, Mapping[str, Any]], *,
                seed: int = 0, progress: bool = False, allocation: Allocation | None = None,
                budget: RankBudget | None = None) -> tuple[list[LayerSpec], list[InitResult]]:
    """``init_layer`` per layer from the collected ``stats``: the layer records (at their final ranks and scales)
    and the checked results. With ``budget`` (from :func:`check_layers`), the initializer first chooses each
    layer's rank (``RankAllocation.allocate``); the ranks are checked (bounds, exact sum) and the layers
    initialized at them, with the alpha and scale ``allocation`` gives for each rank."""
    name = initializer.registry_name
    collected: dict[str, dict[str, Any]] = {k: dict(v) for k, v in stats.items()}
    if budget is not None:
        ranks = budget.check(initializer.allocate([context(s, seed, collected.get(s.name)) for s in layers], budget),
                             name)
        if getattr(initializer.options, "distributed", False) and dist_helpers.active():
            import torch.distributed as dist

            box = [ranks]  # rank 0's allocation everywhere: an ulp of difference must not change a layer's shape
            dist.broadcast_object_list(box, src=0)
            ranks = box[0]
        # a layer allocated rank 0 gets no adapter (rank_min=0, e.g. heterolora): it leaves the plan here
        layers = [LayerSpec(s.name, s.module, ranks[s.name],
                            allocation.alpha(s.name, ranks[s.name]) if allocation and allocation.alpha else s.alpha,
                            allocation.scaling(s.name, ranks[s.name]) if allocation and allocation.scaling
                            else s.scaling) for s in layers if ranks[s.name] > 0]
        if not layers:
            raise ValueError(f"initializer {name!r} allocated rank 0 to every target layer; raise rank_budget")
        for spec in layers:
            initializer.check_layer(context(spec, seed))
    sharded = dist_helpers.active() and any(is_dtensor(s.module.weight) for s in layers)
    if sharded:  # reading a weight is a collective: the ranks must hold the same layers, or they would hang
        dist_helpers.check_same([(s.name, tuple(weight_shape(s.module)), s.rank) for s in layers] + [name],
                                f"FSDP2-sharded {name!r} init")
    if not sharded and initializer.uses_data and getattr(initializer.options, "distributed", False) \
            and dist_helpers.active():
        return list(layers), _split_across_ranks(initializer, layers, seed, collected, progress)
    results, error = [], None
    try:
        for spec in tqdm(layers, desc=f"lowrank init {name}", disable=not progress, leave=False):
            with torch.no_grad():
                res = initializer.init_layer(context(spec, seed, collected.pop(spec.name, None)))  # pop: free G
            check_result(res, spec, name, initializer.offset)
            results.append(compact(res))
    except Exception as exc:  # noqa: BLE001  (re-raised; under FSDP2 on every rank, not a hang)
        error = exc
    if sharded:
        _broadcast_results(results, error)
    elif error is not None:
        raise error
    return list(layers), results


def _broadcast_results(results: list[InitResult], error: BaseException | None) -> None:
    """FSDP2-sharded bases: every rank ran every ``init_layer`` in the same order (reading a sharded weight is a
    collective, so the layers cannot be split across ranks); rank 0's factors are kept everywhere."""
    dist_helpers.agree(error, what="initialization")
    for res in results:
        res.A, res.B = res.A.contiguous(), res.B.contiguous()
        res.extras = {k: t.contiguous() for k, t in res.extras.items()}
        if res.offset_factors is not None:
            res.offset_factors = (res.offset_factors[0].contiguous(), res.offset_factors[1].contiguous())
        dist_helpers.broadcast_([res.A, res.B, *res.extras.values(), *(res.offset_factors or ())], src=0)


def initialize_layers(initializer: Initializer, layers: Sequence[LayerSpec], *, seed: int = 0,
                      model: nn.Module | None = None, data: Iterable | None = None, loss_fn: Callable | None = None,
                      stats: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = False,
                      allocation: Allocation | None = None) -> tuple[list[LayerSpec], list[InitResult]]:
    """:func:`check_layers`, :func:`collect_layers` (unless ``stats``, ``{layer: {key: value}}``, replaces the data
    pass, e.g. to evaluate an initializer on a known gradient) and :func:`init_layers`, in order."""
    budget = check_layers(initializer, layers, seed, allocation)  # bad budgets fail before the data pass
    if stats is None:
        stats = collect_layers(initializer, layers, model=model, data=data, loss_fn=loss_fn)
    return init_layers(initializer, layers, stats, seed=seed, progress=progress, allocation=allocation,
                       budget=budget)


def owners(layers: Sequence[LayerSpec], world: int) -> list[int]:
    """The rank that factorizes each layer: largest layers first, each to the least-loaded rank (cost
    ``m n min(m, n)``, an SVD's), ties to the lower rank; the same answer on every rank."""
    return dist_helpers.balance([weight_shape(s.module)[0] * weight_shape(s.module)[1] * min(weight_shape(s.module))
                                 for s in layers], world)


def _split_across_ranks(initializer: Initializer, layers: Sequence[LayerSpec], seed: int,
                        collected: dict[str, dict[str, Any]], progress: bool) -> list[InitResult]:
    """Under torch.distributed (every rank holds the same all-reduced statistics): each layer's
    ``init_layer`` (its SVD) runs on one rank only, then its factors are broadcast from that rank, so
    the work falls with the number of ranks and every rank ends with the same bits."""
    import torch.distributed as dist

    name, rank, world = initializer.registry_name, dist.get_rank(), dist.get_world_size()
    owner = owners(layers, world)
    mine: dict[int, InitResult] = {}
    error: BaseException | None = None
    try:
        for i, spec in enumerate(tqdm(layers, desc=f"lowrank init {name} (rank {rank})", disable=not progress,
                                      leave=False)):
            stats = collected.pop(spec.name, None)
            if owner[i] != rank:
                continue
            with torch.no_grad():
                res = initializer.init_layer(context(spec, seed, stats))
            check_result(res, spec, name, initializer.offset)
            mine[i] = compact(res)
    except Exception as exc:  # noqa: BLE001  (raised below on this rank, and as an error on every other)
        error = exc
    dist_helpers.agree(error, what="initialization")
    # What each owner produced (dtypes, extras' shapes, offset), so the others can receive it.
    layout = {i: (str(r.A.dtype), str(r.B.dtype), r.offset, {k: (tuple(t.shape), str(t.dtype)) for k, t in r.extras.items()})
              for i, r in mine.items()}
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, layout)
    every = {i: lay for part in gathered for i, lay in part.items()}
    device = layers[0].module.weight.device if layers else torch.device("cpu")
    dt = lambda s: getattr(torch, s.removeprefix("torch."))  # noqa: E731
    results = []
    for i, spec in enumerate(layers):
        res = mine.get(i)
        if res is None:
            a_dt, b_dt, offset, extras = every[i]
            m, n = weight_shape(spec.module)
            res = InitResult(A=torch.empty(spec.rank, n, dtype=dt(a_dt), device=device),
                             B=torch.empty(m, spec.rank, dtype=dt(b_dt), device=device), offset=offset,
                             extras={k: torch.empty(shape, dtype=dt(d), device=device) for k, (shape, d) in extras.items()})
        else:
            res.A, res.B = res.A.contiguous(), res.B.contiguous()
            res.extras = {k: t.contiguous() for k, t in res.extras.items()}
        dist_helpers.broadcast_([res.A, res.B, *res.extras.values()], src=owner[i])
        results.append(res)
    return results
