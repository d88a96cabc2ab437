"""``inject``: wrap matching layers of a model with adapters, freeze the base, initialize.

Atomic: everything that can fail (config, targets, ranks, data-driven statistics, every
layer's initialization) runs before the model is touched; the commit that follows keeps what
it replaces and puts it back if anything still goes wrong. On failure the model has the same
modules, the same weight tensors and the same ``requires_grad`` flags as before.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .adapters.base import SUPPORTED_TYPES, Adapter, weight_shape, weight_view
from .config import LoRAConfig, matches_targets
from .init.base import InitResult
from .init.statistics import default_loss  # noqa: F401  (public here too: lowrank.default_loss)
from .init.driver import LayerSpec, offset_is_finite, offsets_in_place, run_initializer
from .registry import get_adapter

RECORD_ATTR = "_lowrank_record"


@dataclass
class Target:
    """One module to adapt, with its resolved per-layer hyperparameters."""

    name: str
    module: nn.Module
    rank: int
    alpha: float
    scaling: float


@dataclass
class InjectionRecord:
    """Kept on the model (``model._lowrank_record``) so ``unload`` can undo what ``inject`` did."""

    config: LoRAConfig
    requires_grad: dict[str, bool]
    origin: dict[str, Any] | None = None
    """Loaded from a file whose initializer is not installed here: its ``init`` and ``init_options``."""


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """Yield ``(dotted name, adapter layer)`` for every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            yield name, module


def _adaptable_names(model: nn.Module, limit: int = 8) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]
    return names[:limit] + (["..."] if len(names) > limit else [])


def _check_not_sharded(name: str, weight: torch.Tensor) -> None:
    """FSDP2 (DTensor), FSDP1 flat parameters and DeepSpeed ZeRO-3 hold only a shard of each weight."""
    sharded = (type(weight).__name__ == "DTensor" or hasattr(weight, "ds_id") or hasattr(weight, "_fsdp_flattened")
               or weight.numel() == 0)
    if sharded:
        raise TypeError(f"layer {name!r} has a sharded weight ({type(weight).__name__}, FSDP / ZeRO-3): lowrank needs the "
                        "full weight. Inject (and initialize) before sharding the model, then wrap it")


def _wrapper_of(model: nn.Module) -> str | None:
    """``"torch.compile"`` / ``"DataParallel"`` when ``model`` is such a wrapper (its names gain a prefix)."""
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        return "torch.compile"
    if isinstance(model, nn.DataParallel):
        return "DataParallel"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside ``torch.compile``, ``DataParallel`` and ``DistributedDataParallel`` wrappers, so that
    saved names are the plain model's (``_orig_mod.`` and ``module.`` prefixes dropped)."""
    while True:
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def find_targets(model: nn.Module, config: LoRAConfig, ranks: Mapping[str, int] | None = None) -> list[Target]:
    """The modules ``config.targets`` selects, validated (type, rank limits, dtype); ``ranks`` overrides
    the config's per-layer ranks (allocated ones, read back from a saved adapter)."""
    adapter_cls = get_adapter(config.adapter)
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            aliases.setdefault(id(module), []).append(name)
    targets = []
    for name, module in model.named_modules():
        names = aliases.get(id(module), [name])
        if not name or not any(matches_targets(config.targets, n) for n in names):
            continue
        if len(names) > 1:
            raise ValueError(f"module {name!r} is also reachable as {names[1:]} (one {type(module).__name__} object "
                             "under several names, e.g. self.a = self.b = layer); adapting it would leave the other "
                             "use(s) unadapted. Give each use its own module (copy.deepcopy) or target another layer")
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_meta:
            raise ValueError(f"layer {name!r} is on the meta device (its weights are not materialized); load or "
                             "materialize the model first (e.g. from_pretrained without device_map='meta', or "
                             "model.to_empty(device=...) followed by loading the weights), then inject")
        if not adapter_cls.supports(module):
            raise TypeError(
                f"target {config.targets!r} matched {name!r}, a {type(module).__name__}; adapter "
                f"{config.adapter!r} wraps only {', '.join(t.__name__ for t in SUPPORTED_TYPES)}. "
                f"Narrow targets to those (e.g. {_adaptable_names(model, 3)})")
        _check_not_sharded(name, module.weight)
        if not module.weight.dtype.is_floating_point:
            raise TypeError(f"layer {name!r} has a {module.weight.dtype} weight; lowrank adapts floating-point weights only")
        m, n = weight_shape(module)
        rank = ranks[name] if ranks is not None and name in ranks else config.rank_for(name)
        if rank > min(m, n):
            raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = min({m}, {n}) = {min(m, n)} for layer {name!r}; "
                             f"use rank <= {min(m, n)} (or rank_pattern={{{name!r}: {min(m, n)}}})")
        targets.append(Target(name, module, rank, config.alpha_for(name, rank), config.scaling_for(name, rank)))
    if not targets:
        raise ValueError(f"targets {config.targets!r} matched no module of {type(model).__name__}; names match the "
                         f"full dotted path or its last components. Adaptable modules include: {_adaptable_names(model)}")
    return targets


def find_trainable(model: nn.Module, names: Sequence[str], targets: Sequence[Target]) -> list[tuple[str, nn.Module]]:
    """The modules ``config.trainable`` names (trained in full, e.g. a new classifier head)."""
    target_names = {t.name for t in targets}
    found = []
    for pattern in names:
        hits = [(n, m) for n, m in model.named_modules() if n and matches_targets([pattern], n)]
        if not hits:
            children = [n for n, _ in model.named_children()]
            raise ValueError(f"trainable module {pattern!r} matches nothing in {type(model).__name__}; "
                             f"top-level modules: {children}")
        clash = [n for n, _ in hits if n in target_names]
        if clash:
            raise ValueError(f"module {clash[0]!r} is both a LoRA target and in trainable; choose one")
        inside = [(n, t) for n, _ in hits for t in sorted(target_names) if t.startswith(n + ".")]
        if inside:
            n, t = inside[0]
            raise ValueError(f"trainable module {n!r} contains the LoRA target {t!r}: training it in full would make "
                             "the target's frozen (possibly offset) base weight trainable. Name only the modules to "
                             f"train in full (e.g. the head), not a parent of {t!r}")
        found.extend(hits)
    return found


def shared_weight_users(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """Parameters outside ``module`` that share storage with its weight (tied weights, e.g. GPT-2's
    ``lm_head`` and ``wte``): changing the weight's data would change them too."""
    ptr = module.weight.untyped_storage().data_ptr()
    own = {id(p) for p in module.parameters()}
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if not n.startswith(f"{name}.") and (id(p) in own or p.untyped_storage().data_ptr() == ptr)]


def _check_untied(model: nn.Module, targets: Sequence[Target], results: Sequence[InitResult], init_name: str) -> None:
    for t, res in zip(targets, results):
        if res.offset:
            users = shared_weight_users(model, t.name, t.module)
            if users:
                raise ValueError(
                    f"layer {t.name!r} shares its weight with {users[0]!r} (tied weights); initializer {init_name!r} "
                    f"offsets the base weight (W = W0 - s B A), which would change {users[0]!r} too. Untie first "
                    f"(e.g. model.{t.name}.weight = torch.nn.Parameter(model.{t.name}.weight.detach().clone()), and "
                    "set config.tie_word_embeddings = False for transformers models), drop the layer from targets, "
                    "or use an initializer without offset (kaiming, gaussian with b_std=0, lora_one, eva)")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


ROLLBACKS = ("exact", "recompute")


def _check_offsets(targets: Sequence[Target], results: Sequence[InitResult], init_name: str) -> None:
    """Every offset base weight ``W0 - s B A`` is finite in the weight's dtype (the factors as the layer stores
    them), before any weight is written: the check ``offset_weight`` makes, done up front."""
    for t, res in zip(targets, results):
        if res.offset:
            dt = t.module.weight.dtype
            if not offset_is_finite(t.module, weight_view(t.module), res.A.to(dt), res.B.to(dt), t.scaling):
                raise FloatingPointError(f"layer {t.name!r} ({init_name!r}): the offset base weight W0 - s B A is not "
                                         f"finite (the factors are too large for the weight's dtype {dt}); the model "
                                         "was not changed. Use smaller factors")


def commit(model: nn.Module, config: LoRAConfig, targets: Sequence[Target], results: Sequence[InitResult],
           trainable: Sequence[tuple[str, nn.Module]], rollback: str = "exact") -> None:
    """Swap in the adapter layers, offset base weights, freeze; roll everything back on failure.

    ``rollback="exact"`` keeps every replaced base weight until the end (one extra copy of the offset
    weights), so a failure restores them bit for bit. ``"recompute"`` checks every offset first, then
    writes the offset weights in place (no copy); a failure after that point (only an interrupt or an
    out-of-memory error can cause one) restores them as ``W + s B0 A0``, exact up to one rounding."""
    if rollback not in ROLLBACKS:
        raise ValueError(f"invalid rollback={rollback!r}: must be one of {ROLLBACKS}")
    if rollback == "recompute":
        _check_offsets(targets, results, config.init)
    adapter_cls = get_adapter(config.adapter)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    params = list(model.parameters())
    old_flags = [p.requires_grad for p in params]
    swapped: list[tuple[str, nn.Module]] = []
    old_weights: list[tuple[nn.Module, torch.Tensor]] = []
    in_place: list = []  # layers whose base weight was overwritten (rollback="recompute")
    try:
        for t, res in zip(targets, results):
            layer = adapter_cls(t.module, t.rank, t.alpha, t.scaling, config.dropout)
            layer.train(t.module.training)
            try:
                with offsets_in_place() if rollback == "recompute" else nullcontext():
                    old = layer.initialize(res)
            except FloatingPointError as exc:
                raise FloatingPointError(f"layer {t.name!r} ({config.init!r}): {exc}") from None
            if old is not None:
                old_weights.append((t.module, old))
            elif res.offset:
                in_place.append(layer)
            _set_module(model, t.name, layer)
            swapped.append((t.name, t.module))
        for p in params:
            p.requires_grad_(False)
        for _, layer in adapted_layers(model):
            for p in layer.adapter_parameters().values():
                p.requires_grad_(True)
        for _, module in trainable:
            for p in module.parameters():
                p.requires_grad_(True)
        setattr(model, RECORD_ATTR, InjectionRecord(config, flags))
    except BaseException:
        for name, module in reversed(swapped):
            _set_module(model, name, module)
        for module, old in old_weights:
            module.weight.data = old
        with torch.no_grad():
            for layer in in_place:
                weight_view(layer.base_layer).copy_(layer.original_weight().to(layer.base_layer.weight.dtype))
        for p, flag in zip(params, old_flags):
            p.requires_grad_(flag)
        raise


def inject(model: nn.Module, config: LoRAConfig, data: Iterable | None = None,
           loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, *, progress: bool = True,
           rollback: str = "exact") -> nn.Module:
    """Adapt ``model`` in place: wrap every target layer, freeze the base, run ``config.init``.

    Args:
        model: any ``nn.Module`` (e.g. a Hugging Face ``transformers`` model).
        config: the :class:`LoRAConfig`.
        data: an iterable of batches, for data-driven initializers (LoRA-GA, LoRA-One, ...).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; defaults to ``model(**batch).loss``.
        progress: show progress bars.
        rollback: ``"exact"`` (default) keeps each replaced base weight until the injection has succeeded;
            ``"recompute"`` writes offset base weights in place, saving one copy of the adapted weights
            on large models (:func:`commit`). Bad input is caught before any write in both.

    Returns ``model``. Raises (leaving the model exactly as it was) on any bad input.
    """
    wrapped = _wrapper_of(model)
    if wrapped:
        raise TypeError(f"inject into the model before wrapping it in {wrapped} (its module names carry the wrapper's "
                        "prefix, and a compiled graph would not see the new layers): lowrank.inject(model, config), then "
                        "wrap; save_adapter / load_adapter / peft.export accept the wrapped model and unwrap it")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("inject into the model before wrapping it in DistributedDataParallel (DDP fixes its parameter "
                        "list at construction): lowrank.inject(model, config, data=shard) on every rank, then "
                        "DistributedDataParallel(model)")
    if rollback not in ROLLBACKS:
        raise ValueError(f"invalid rollback={rollback!r}: must be one of {ROLLBACKS}")
    if any(True for _ in adapted_layers(model)):
        raise ValueError(f"{type(model).__name__} already has lowrank adapters; call lowrank.unload(model) "
                         f"before injecting again")
    targets = find_targets(model, config)
    trainable = find_trainable(model, config.trainable, targets)
    initializer = config.make_initializer()
    if not initializer.uses_data and data is not None:
        warnings.warn(f"initializer {config.init!r} does not use data; the data passed to inject is ignored", stacklevel=2)
    results = run_initializer(initializer, [LayerSpec(t.name, t.module, t.rank, t.alpha, t.scaling) for t in targets],
                              seed=config.seed, model=model, data=data, loss_fn=loss_fn, progress=progress,
                              allocation=config.allocation([t.name for t in targets]))
    for t, res in zip(targets, results):  # ranks an initializer allocated under a budget
        if res.A.shape[0] != t.rank:
            t.rank = res.A.shape[0]
            t.alpha, t.scaling = config.alpha_for(t.name, t.rank), config.scaling_for(t.name, t.rank)
    _check_untied(model, targets, results, config.init)
    commit(model, config, targets, results, trainable, rollback=rollback)
    return model
