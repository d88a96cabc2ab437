"""Gradient-based initializers (LoRA-GA, LoRA-One, LoRA-SB, GoRA) and :func:`estimate_gradients`.

The estimate itself is the ``"gradient"`` statistic of the one statistics pass
(:mod:`lowrank.init.statistics`): for every target layer ``G = (1/N) sum_b dL_b/dW``, the true
mean over ``N`` batches of each batch's gradient, float32 ``(d_out, d_in)``, collected by hooks
(no ``.grad`` is materialized), with the model, its flags, modes and RNG left as they were, and
all-reduced under ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from .base import Initializer
from .statistics import collect_statistics, data_options_check


def estimate_gradients(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                       loss_fn: Callable[[nn.Module, Any], torch.Tensor], *, num_batches: int | None = None,
                       train_mode: bool = False, offload: bool = False, progress: bool = True,
                       distributed: bool = True) -> dict[str, torch.Tensor]:
    """Mean gradient ``G`` (float32, ``(d_out, d_in)``) of every layer in ``modules`` over ``num_batches`` batches.

    ``loss_fn(model, batch)`` returns the batch's scalar loss (a mean over its examples); it may call
    ``backward`` itself (then return a detached loss): every backward pass during the call counts towards
    that batch's gradient. The other arguments are those of
    :func:`lowrank.init.statistics.collect_statistics`.
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


GradientOptions = DataOptions
"""The options of gradient-based initializers (the statistics pass's)."""


class DataInitializer(Initializer):
    """Base of initializers that declare statistics in ``needs``; the pass runs with :class:`DataOptions`."""

    Options = DataOptions
    needs: ClassVar[tuple[str, ...]] = ()

    def collect(self, model, modules, data, loss_fn):
        o = self.options
        return collect_statistics(model, modules, data, loss_fn, self.needs, num_batches=o.num_batches,
                                  train_mode=o.train_mode, offload=o.offload, progress=o.progress,
                                  distributed=o.distributed, mask_padding=o.mask_padding)


class GradientInitializer(DataInitializer):
    """Base of initializers that need ``G = dL/dW`` at initialization (``ctx.gradient()``)."""

    needs = ("gradient",)
