"""``inject``: wrap matching layers of a model with adapters, freeze the base, initialize.

One route, four stops, each downward and each passed once: :func:`lowrank.plan.plan` (targets, ranks,
scales, every data-free check, the one initializer instance) -> ``collect_layers`` (the initializer's data
pass, ``DataInitializer.collect``) -> ``init_layers`` (``init_layer`` per layer, after the initializer allocated
ranks under a budget; split across torch.distributed ranks; ``lowrank.init.driver``) ->
:func:`lowrank.plan.commit` (the only writer of the model). Atomic: everything that can fail runs before the
commit, and the commit puts back what it replaced if anything still goes wrong. On failure the model has the
same modules, the same weight tensors and the same ``requires_grad`` flags as before.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .config import LoRAConfig
from .init.driver import collect_layers, init_layers
from .init.collect import default_loss  # noqa: F401  (public here too: lowrank.default_loss)
from .plan import (  # noqa: F401  (public here too)
    RECORD_ATTR, ROLLBACKS, InjectionRecord, Plan, adapted_layers, check_untied, commit, find_targets,
    find_trainable, plan, shared_weight_users, unwrap,
)


def inject(model: nn.Module, config: LoRAConfig, data: Iterable | None = None,
           loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, *, progress: bool = True,
           rollback: str = "auto") -> nn.Module:
    """Adapt ``model`` in place: wrap every target layer, freeze the base, run ``config.init``.

    Args:
        model: any ``nn.Module`` (e.g. a Hugging Face ``transformers`` model).
        config: the :class:`LoRAConfig`.
        data: an iterable of batches, for data-driven initializers (LoRA-GA, LoRA-One, ...).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; defaults to ``model(**batch).loss``.
        progress: show progress bars.
        rollback: ``"exact"`` keeps each replaced base weight until the injection has succeeded (a failure
            restores them bit for bit); ``"recompute"`` writes offset base weights in place, saving one copy of
            the adapted weights (a failure restores ``W + s B0 A0``, exact up to one rounding;
            :func:`lowrank.plan.commit`); ``"auto"`` (default): exact while the copies total at most
            ``lowrank.plan.EXACT_ROLLBACK_MAX_BYTES`` (1 GiB), recompute beyond. Bad input is caught before any
            write in all three.

    Returns ``model``. Raises (leaving the model exactly as it was) on any bad input.
    """
    p = plan(model, config, rollback=rollback)
    if not p.initializer.uses_data and data is not None:
        warnings.warn(f"initializer {config.init!r} does not use data; the data passed to inject is ignored", stacklevel=2)
    stats = collect_layers(p.initializer, p.layers, model=model, data=data, loss_fn=loss_fn)
    layers, results = init_layers(p.initializer, p.layers, stats, seed=config.seed, progress=progress,
                                  allocation=p.allocation, budget=p.budget)
    p = p.with_layers(layers)  # the ranks (and scales) an initializer allocated under a budget
    if p.initializer.offset is None:  # undeclared: known from the results only
        check_untied(model, p.layers, config.init, results)
    commit(p, results)
    return model
