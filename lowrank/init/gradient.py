"""Gradient-based initializers (LoRA-GA, LoRA-One, LoRA-SB, GoRA) and :func:`estimate_gradients`.

The estimate itself is the ``"gradient"`` statistic of the one statistics pass
(:mod:`lowrank.init.collect`): for every target layer ``G = (1/N) sum_b dL_b/dW``, the true
mean over ``N`` batches of each batch's gradient, float32 ``(d_out, d_in)``, collected by hooks
(no ``.grad`` is materialized), with the model, its flags, modes and RNG left as they were, and
all-reduced under ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from ..weights import weight_shape
from .base import Initializer
from .sketch import DEFAULT_PASSES, ESTIMATORS, sketch_gradient_svd
from .collect import check_needs, collect_statistics, data_options_check

DENSE_G_MAX_BYTES = 1 << 30
"""``estimator="auto"``: the dense ``G`` of all target layers up to this many bytes (1 GiB), sketched beyond."""


def estimate_gradients(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                       loss_fn: Callable[[nn.Module, Any], torch.Tensor], *, num_batches: int | None = None,
                       train_mode: bool = False, offload: bool = False, progress: bool = True,
                       distributed: bool = True) -> dict[str, torch.Tensor]:
    """Mean gradient ``G`` (float32, ``(d_out, d_in)``) of every layer in ``modules`` over ``num_batches`` batches.

    ``loss_fn(model, batch)`` returns the batch's scalar loss (a mean over its examples); it may call
    ``backward`` itself (then return a detached loss): every backward pass during the call counts towards
    that batch's gradient. The other arguments are those of
    :func:`lowrank.init.collect.collect_statistics`.
    """
    stats = collect_statistics(model, modules, data, loss_fn, ("gradient",), num_batches=num_batches,
                               train_mode=train_mode, offload=offload, progress=progress, distributed=distributed)
    return {name: s["gradient"] for name, s in stats.items()}


@dataclass(frozen=True)
class DataOptions:
    """Options of the statistics pass, shared by every data-driven initializer."""

    num_batches: int | None = None
    """Batches of ``data`` to use (``None``: all of it)."""
    train_mode: bool = False
    """Collect with dropout on (``model.train()``); default ``eval()``, deterministic."""
    offload: bool = False
    """Keep the float32 accumulators on the CPU."""
    progress: bool = True
    """Progress bar over batches."""
    distributed: bool = True
    """Under torch.distributed, use every rank's batches (each rank passes its shard)."""
    mask_padding: bool = True
    """Input statistics skip padding tokens (a dict batch's ``attention_mask``)."""

    def __post_init__(self):
        data_options_check(self.num_batches)


class DataInitializer(Initializer):
    """The data protocol: initializers that declare the statistics they need in ``needs``; one pass collects them
    (:func:`~lowrank.init.collect.collect_statistics`, run with :class:`DataOptions`) before ``init_layer``."""

    Options = DataOptions
    needs: ClassVar[tuple[str, ...]] = ()
    """Statistics the data pass must collect (registered names, ``lowrank.list_statistics()``): built in
    ``"gradient"``, ``"covariance"``, ``"input_svd"``; a new one is a ``lowrank.init.stats.Statistic`` class
    registered with ``lowrank.register_statistic``. One pass collects exactly these (forward-only ones without
    backward)."""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if not (isinstance(cls.needs, tuple) and all(isinstance(n, str) and n for n in cls.needs)):
            raise TypeError(f"initializer {cls.__name__}: needs must be a tuple of statistic names, e.g. "
                            f"('gradient',), got {cls.needs!r}")
        if cls.needs:
            cls.uses_data = True

    def __init__(self, **options: Any):
        # checked when built, not at class definition: a plug-in's statistic may register after its initializer
        check_needs(self.needs, f"initializer {self.registry_name!r}")
        super().__init__(**options)

    def collect(self, model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable | None,
                loss_fn: Callable | None, *, ranks: Mapping[str, int]) -> dict[str, dict[str, Any]]:
        """Per-layer statistics (``{name: {"gradient": G, ...}}``) from ``data``, leaving the model as it found it.
        ``loss_fn`` is the user's, or ``None`` (then the model's ``.loss``, or its plain forward for forward-only
        statistics); ``ranks`` the layers' configured ranks (e.g. to size a sketch). Override only for a pass of
        your own; a new statistic is a registered ``lowrank.init.stats.Statistic`` instead."""
        o = self.options
        return collect_statistics(model, modules, data, loss_fn, self.needs, num_batches=o.num_batches,
                                  train_mode=o.train_mode, offload=o.offload, progress=o.progress,
                                  distributed=o.distributed, mask_padding=o.mask_padding)


@dataclass(frozen=True)
class GradientOptions(DataOptions):
    """Options of gradient-based initializers: the statistics pass's, and how ``G`` is estimated."""

    estimator: str = "auto"
    """``dense``: ``G`` itself, ``(d_out, d_in)`` float32 per layer. ``sketch``: only its top singular
    triplets, from sketches in ``O((d_out + d_in) k)`` memory (``lowrank.init.sketch``), for methods that
    need no more (LoRA-GA, LoRA-One). ``auto`` (default): ``dense`` while the dense ``G`` of all target layers
    totals at most ``DENSE_G_MAX_BYTES`` (1 GiB: exact, and every model of the committed ablations), ``sketch``
    beyond for the methods that can use it (on a 7B model the dense ``G`` would be another copy of the adapted
    weights)."""
    sketch_size: int | None = None
    """Sketch width ``k`` (default four times the triplets the method needs, ``8r`` for LoRA-GA)."""
    passes: int | None = None
    """Passes over the data for the sketch (default ``lowrank.init.sketch.DEFAULT_PASSES``); each one more
    forward + backward over the same batches."""
    krylov: bool = False
    """Sketch with several passes: factorize the whole block Krylov space of the passes (every block of the
    last side, ``Omega`` included) rather than the last block alone (subspace iteration). A little more
    accurate (on MiniLM at 3 passes, median excess over the Eckart-Young floor 2.2e-4 against 2.9e-4), at
    ``(2 d_out + d_in) k`` floats per layer at the peak instead of ``(d_out + d_in) k``."""
    sketch_seed: int = 0
    """Seed of the sketches' random test matrices."""
    shard_state: bool | None = None
    """Sketch under torch.distributed: keep each layer's sketch state (basis and sums) on one owner rank
    (``True``) or on every rank (``False``); ``None`` (default): split on an FSDP2-sharded model, replicated
    otherwise. Split, a rank holds ``1/N`` of the ``(d_out + d_in) k`` floats per layer, for a broadcast and a
    reduce per layer and batch; every rank must then run the same number of batches, and an error on one rank
    mid-pass halts the others instead of reaching them (``lowrank.init.sketch``): on an unsharded model, opt in
    only with even, checked shards."""

    def __post_init__(self):
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"invalid estimator={self.estimator!r}: must be one of {ESTIMATORS}")
        for key in ("sketch_size", "passes"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"invalid {key}={v!r}: must be a positive int or None (the default)")
        if self.estimator != "sketch" and (self.sketch_size is not None or self.passes is not None or self.krylov):
            raise ValueError("sketch_size, passes and krylov apply to estimator='sketch'; set estimator='sketch' or "
                             "drop them")
        if self.shard_state is not None and not isinstance(self.shard_state, bool):
            raise ValueError(f"invalid shard_state={self.shard_state!r}: must be True, False or None (the default)")
        if self.estimator == "dense" and self.shard_state is not None:
            raise ValueError("shard_state applies to the sketch (estimator='sketch' or 'auto'); the dense G is "
                             "all-reduced whole: drop shard_state or use estimator='sketch'")


class GradientInitializer(DataInitializer):
    """Base of initializers that need ``G = dL/dW`` at initialization (``ctx.gradient()``, or its top
    singular triplets ``ctx.gradient_svd(k)``, which a sketch can give without forming ``G``)."""

    Options = GradientOptions
    needs = ("gradient",)
    sketchable: ClassVar[bool] = False
    """True if ``init_layer`` only uses ``ctx.gradient_svd(triplets(rank))``, so ``estimator="sketch"`` fits."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.options.estimator == "sketch" and not self.sketchable:
            raise ValueError(f"initializer {self.registry_name!r} needs the dense gradient G, not only its top singular "
                             "triplets; estimator='sketch' cannot give it. Use estimator='dense' (optionally "
                             "offload=True), or a method that works from triplets (lora_ga, lora_one)")

    def triplets(self, rank: int) -> int:
        """How many top singular triplets of ``G`` ``init_layer`` reads at this rank (sketchable methods)."""
        raise NotImplementedError

    def sketches(self) -> bool:
        """Whether this instance, with its options, can work from a sketch (``estimator="auto"`` may pick one):
        ``sketchable`` by default; a method whose options select a dense-only variant says no."""
        return self.sketchable

    def check_layer(self, ctx) -> None:
        super().check_layer(ctx)
        o = self.options
        if o.estimator == "sketch" and o.sketch_size is not None and o.sketch_size < self.triplets(ctx.rank):
            raise ValueError(f"sketch_size={o.sketch_size} is smaller than the {self.triplets(ctx.rank)} singular "
                             f"triplets {self.registry_name!r} needs at rank {ctx.rank} (layer {ctx.name!r}); use "
                             f"sketch_size >= {self.triplets(ctx.rank)} or the default")

    def estimator_for(self, modules) -> str:
        """The estimator the pass uses: ``options.estimator``, with ``"auto"`` resolved from the dense ``G``'s size."""
        o = self.options
        if o.estimator != "auto":
            return o.estimator
        if not self.sketches():
            return "dense"
        dense = sum(4 * weight_shape(m)[0] * weight_shape(m)[1] for m in modules.values())
        return "sketch" if dense > DENSE_G_MAX_BYTES else "dense"

    def collect(self, model, modules, data, loss_fn, *, ranks):
        o = self.options
        if self.estimator_for(modules) == "dense":
            return super().collect(model, modules, data, loss_fn, ranks=ranks)
        svd = sketch_gradient_svd(model, modules, data, loss_fn, k={n: self.triplets(ranks[n]) for n in modules},
                                  sketch_size=dict.fromkeys(modules, o.sketch_size) if o.sketch_size else None,
                                  passes=o.passes or DEFAULT_PASSES, krylov=o.krylov, seed=o.sketch_seed,
                                  num_batches=o.num_batches,
                                  train_mode=o.train_mode, progress=o.progress, distributed=o.distributed,
                                  shard_state=o.shard_state)
        return {n: {"gradient_svd": v} for n, v in svd.items()}
