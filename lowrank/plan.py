"""The first and last stops of ``lowrank.inject``: :func:`plan` (every check that needs no data) and
:func:`commit` (the only writer of the model).

``inject(model, cfg, data)`` is ``plan`` -> ``collect_layers`` (the initializer's data pass) -> ``init_layers``
(``init_layer`` per layer; ``lowrank.init.driver``) -> ``commit``. :func:`plan` resolves the targets into one frozen record per layer
(``LayerSpec``: module, rank, alpha, scale ``s``), the modules trained in full, and the one initializer instance
of the call, and refuses everything it can before the (possibly long) data pass: wrapped models, meta or sharded
weights, ranks that do not fit, one module under two names, a trainable parent of a target, each layer's
``check_layer``, a rank budget's bounds, and, for an
initializer that declares it offsets the base (``Initializer.offset``), tied weights. :func:`commit` swaps the
adapter layers in, writes offsets, freezes the base, and on any failure puts everything back
(``lowrank.weights.Journal``). ``load_adapter`` goes through the same pair.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .adapters.base import Adapter
from .weights import SUPPORTED_TYPES, weight_dtype, weight_shape, weight_view
from .config import LoRAConfig, matches_targets
from .init.base import InitResult, Initializer
from .init.budget import RankBudget
from .init.driver import Allocation, LayerSpec, check_layers
from .registry import INITIALIZERS, get_adapter
from . import distributed as dist_helpers
from .sharding import is_dtensor, local_rows, row_sharded
from .weights import Journal, offset_is_finite, offsets_in_place, original_weight, restore_shard_in_place

RECORD_ATTR = "_lowrank_record"


@dataclass
class InjectionRecord:
    """Kept on the model (``model._lowrank_record``) so ``unload`` can undo what ``inject`` did."""

    config: LoRAConfig
    requires_grad: dict[str, bool]
    origin: dict[str, Any] | None = None
    """Loaded from a file whose initializer is not installed here: its ``init`` and ``init_options``."""
    frozen: tuple[str, ...] = ()
    """The adapter parameters the initializer keeps as initialized (MiCA's ``B``): written with a saved adapter,
    so it reloads with them frozen wherever it is loaded (a temporary ``requires_grad_(False)`` is not)."""


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """Yield ``(dotted name, adapter layer)`` for every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            yield name, module


def _adaptable_names(model: nn.Module, limit: int = 8) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]
    return names[:limit] + (["..."] if len(names) > limit else [])


def _check_not_sharded(name: str, weight: torch.Tensor) -> None:
    """FSDP2's row shards (``DTensor``, ``Shard(0)``) are supported (:mod:`lowrank.sharding`); FSDP1 flat parameters,
    DeepSpeed ZeRO-3 and other ``DTensor`` placements hold a part of each weight lowrank cannot address."""
    if is_dtensor(weight):
        if not row_sharded(weight):
            raise TypeError(f"layer {name!r} has a DTensor weight placed {weight.placements}: lowrank writes FSDP2's "
                            "row shards (Shard(0), Replicate()) only; shard it with fully_shard's default placement (no "
                            "shard_placement_fn), or inject before sharding")
        return
    if hasattr(weight, "ds_id") or hasattr(weight, "_fsdp_flattened") or weight.numel() == 0:
        raise TypeError(f"layer {name!r} has a sharded weight ({type(weight).__name__}, FSDP1 / ZeRO-3): lowrank needs "
                        "the full weight or FSDP2's row shards. Inject (and initialize) before sharding the model, or "
                        "shard it with torch.distributed.fsdp.fully_shard (FSDP2)")


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


def find_targets(model: nn.Module, config: LoRAConfig, ranks: Mapping[str, int] | None = None,
                 initializer: Initializer | None = None) -> list[LayerSpec]:
    """The modules ``config.targets`` selects, validated (type, rank limits, dtype); ``ranks`` overrides
    the config's per-layer ranks (allocated ones, read back from a saved adapter; their alphas as
    ``initializer``, the call's instance, adjusts them)."""
    adapter_cls = get_adapter(config.adapter)
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            aliases.setdefault(id(module), []).append(name)
    targets = []
    adapter_options = config.make_adapter_options()
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
        if not weight_dtype(module).is_floating_point:
            raise TypeError(f"layer {name!r} has a {module.weight.dtype} weight; lowrank adapts floating-point weights only")
        m, n = weight_shape(module)
        rank = ranks[name] if ranks is not None and name in ranks else config.rank_for(name)
        if rank > min(m, n):
            raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = min({m}, {n}) = {min(m, n)} for layer {name!r}; "
                             f"use rank <= {min(m, n)} (or rank_pattern={{{name!r}: {min(m, n)}}})")
        adapter_cls.check_layer(name, module, rank, adapter_options)  # the adapter's own limits (GraLoRA's k)
        targets.append(LayerSpec(name, module, rank, config.alpha_for(name, rank, initializer),
                                 config.scaling_for(name, rank, initializer)))
    if not targets:
        raise ValueError(f"targets {config.targets!r} matched no module of {type(model).__name__}; names match the "
                         f"full dotted path or its last components. Adaptable modules include: {_adaptable_names(model)}")
    return targets


def find_trainable(model: nn.Module, names: Sequence[str], targets: Sequence[LayerSpec]) -> list[tuple[str, nn.Module]]:
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
    ptr = _storage(module.weight)
    own = {id(p) for p in module.parameters()}
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if not n.startswith(f"{name}.") and (id(p) in own or _storage(p) == ptr)]


def _storage(p: torch.Tensor) -> int:
    """The address of ``p``'s storage (of its local shard for an FSDP2 ``DTensor``)."""
    return (p.to_local() if is_dtensor(p) else p).untyped_storage().data_ptr()


def check_untied(model: nn.Module, layers: Sequence[LayerSpec], init_name: str,
                 results: Sequence[InitResult] | None = None) -> None:
    """No layer whose base weight will be offset shares that weight (``results=None``: every layer will be,
    as the initializer declares)."""
    for i, spec in enumerate(layers):
        if results is None or results[i].offset:
            users = shared_weight_users(model, spec.name, spec.module)
            if users:
                raise ValueError(
                    f"layer {spec.name!r} shares its weight with {users[0]!r} (tied weights); initializer "
                    f"{init_name!r} offsets the base weight (W = W0 - s B A), which would change {users[0]!r} too. "
                    f"Untie first (e.g. model.{spec.name}.weight = torch.nn.Parameter(model.{spec.name}.weight"
                    ".detach().clone()), and set config.tie_word_embeddings = False for transformers models), drop the "
                    "layer from targets, or use an initializer without offset (kaiming, gaussian with b_std=0, "
                    "lora_one, eva)")


ROLLBACKS = ("auto", "exact", "recompute")
EXACT_ROLLBACK_MAX_BYTES = 1 << 30
"""``rollback="auto"``: keep exact copies of the replaced base weights while they total at most this (1 GiB),
write offsets in place (``"recompute"``) beyond: on a 7B model the copies would double the memory of the
adapted weights."""


def resolve_rollback(rollback: str, layers: Sequence[LayerSpec], init: Initializer | None) -> str:
    """``"auto"`` as ``"exact"`` or ``"recompute"`` from the bytes an exact rollback would copy (the adapted
    weights, when the initializer may offset them; none for one that never does)."""
    if rollback != "auto":
        return rollback
    if init is not None and init.offset is False:
        return "exact"  # nothing is replaced, nothing is copied
    copied = sum(s.module.weight.numel() * s.module.weight.element_size() for s in layers)
    return "exact" if copied <= EXACT_ROLLBACK_MAX_BYTES else "recompute"


@dataclass(frozen=True)
class Plan:
    """What :func:`commit` will do to ``model``, every data-free check made."""

    model: nn.Module
    config: LoRAConfig
    layers: tuple[LayerSpec, ...]
    """One record per target layer, in the model's order."""
    trainable: tuple[tuple[str, nn.Module], ...] = ()
    """Modules trained in full (``config.trainable``)."""
    initializer: Initializer | None = field(default=None, compare=False)
    """The call's one initializer instance (``None`` when the factors come from a file)."""
    rollback: str = "exact"
    """``"exact"`` or ``"recompute"`` (``"auto"`` resolved by :func:`resolve_rollback`)."""
    allocation: Allocation | None = field(default=None, compare=False)
    """Per-layer ranks chosen by the initializer (``rank_budget``, or EVA's ``rho``), with the config's alpha and
    scale rules for them; ``budget`` its checked bounds."""
    budget: RankBudget | None = field(default=None, compare=False)

    def with_layers(self, layers: Sequence[LayerSpec]) -> "Plan":
        """The same plan at other per-layer values (ranks an initializer allocated, a file's alphas)."""
        return replace(self, layers=tuple(layers))


def plan(model: nn.Module, config: LoRAConfig, *, rollback: str = "auto", ranks: Mapping[str, int] | None = None,
         initializer: bool = True) -> Plan:
    """Resolve ``config`` on ``model`` and check everything that needs no data; nothing is changed.

    ``ranks`` overrides the config's per-layer ranks (a saved adapter's); ``initializer=False`` skips building
    the initializer (the factors come from a file)."""
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
    init = config.make_initializer() if initializer else None  # the one instance of this call
    layers = find_targets(model, config, ranks, init)
    trainable = find_trainable(model, config.trainable, layers)
    if init is None:
        return Plan(model, config, tuple(layers), tuple(trainable), None, resolve_rollback(rollback, layers, None))
    allocation = config.allocation([s.name for s in layers], init)
    budget = check_layers(init, layers, config.seed, allocation)
    if init.offset:  # declared: refuse tied weights now, not after the data pass
        check_untied(model, layers, config.init)
    return Plan(model, config, tuple(layers), tuple(trainable), init, resolve_rollback(rollback, layers, init),
                allocation, budget)


def check_offsets(layers: Sequence[LayerSpec], results: Sequence[InitResult], init_name: str) -> None:
    """Every offset base weight ``W0 - s B A`` is finite in the weight's dtype (the factors as the layer stores
    them), before any weight is written: the check ``offset_weight`` makes, done up front. An FSDP2 shard is
    checked on its own rows (no layer is gathered) and the verdicts are agreed across the ranks in one
    all-reduce, so a failure is raised on every rank."""
    sharded = any(is_dtensor(s.module.weight) for s in layers)  # every rank: the same model (checked)
    flags = []
    for spec, res in zip(layers, results):
        ok = True
        if res.offset:
            dt, w = weight_dtype(spec.module), spec.module.weight
            A0, B0 = res.subtracted()
            if is_dtensor(w):  # the rows this rank will write (lowrank.weights._offset_shard's blocks)
                rows = local_rows(w)
                ok = offset_is_finite(spec.module, w.to_local(), A0.to(dt), B0[rows].to(dt), spec.scaling)
            else:
                ok = offset_is_finite(spec.module, weight_view(spec.module), A0.to(dt), B0.to(dt), spec.scaling)
        flags.append(0.0 if ok else 1.0)
        if not ok and not sharded:
            break
    if sharded:
        bad = torch.tensor(flags)
        dist_helpers.all_reduce_(bad, op=torch.distributed.ReduceOp.MAX)
        flags = bad.tolist()
    for spec, flag in zip(layers, flags):
        if flag:
            raise FloatingPointError(f"layer {spec.name!r} ({init_name!r}): the offset base weight W0 - s B A is not "
                                     f"finite (the factors are too large for the weight's dtype "
                                     f"{weight_dtype(spec.module)}); the model was not changed. Use smaller factors")


def _restore_in_place(layer: Adapter) -> None:
    if is_dtensor(layer.base_layer.weight):
        restore_shard_in_place(layer)
    else:
        weight_view(layer.base_layer).copy_(original_weight(layer).to(layer.base_layer.weight.dtype))


def commit(p: Plan, results: Sequence[InitResult]) -> None:
    """Swap in the adapter layers, offset base weights, freeze; roll everything back on failure.

    ``rollback="exact"`` keeps every replaced base weight until the end (one extra copy of the offset
    weights), so a failure restores them bit for bit. ``"recompute"`` checks every offset first, then
    writes the offset weights in place (no copy); a failure after that point (only an interrupt or an
    out-of-memory error can cause one) restores them as ``W + s B0 A0``, exact up to one rounding."""
    model, config = p.model, p.config
    if p.rollback == "recompute":
        check_offsets(p.layers, results, config.init)
    adapter_cls, options = get_adapter(config.adapter), config.make_adapter_options()
    flags = {name: q.requires_grad for name, q in model.named_parameters()}
    journal = Journal(model)
    try:
        for spec, res in zip(p.layers, results):
            layer = adapter_cls(spec.module, spec.rank, spec.alpha, spec.scaling, config.dropout, options)
            layer.train(spec.module.training)
            try:
                with offsets_in_place() if p.rollback == "recompute" else nullcontext():
                    old = layer.initialize(res)
            except FloatingPointError as exc:
                raise FloatingPointError(f"layer {spec.name!r} ({config.init!r}): {exc}") from None
            if old is not None:
                journal.replaced_weight(spec.module, old)
            elif res.offset:
                journal.overwritten(lambda layer=layer: _restore_in_place(layer))
            journal.swap(spec.name, layer)
        adapter_cls.connect(dict(adapted_layers(model)))  # cross-layer links of the adapter's own (ResLoRA)
        for q in model.parameters():
            q.requires_grad_(False)
        frozen = INITIALIZERS.entry(config.init).capabilities["frozen"]  # e.g. MiCA's B, kept as initialized
        for name, layer in adapted_layers(model):
            params = layer.adapter_parameters()
            missing = [f for f in frozen if f not in params]
            if missing:
                raise ValueError(f"initializer {config.init!r} keeps {missing} frozen, which the {config.adapter!r} "
                                 f"adapter of layer {name!r} does not train ({sorted(params)}); use adapter='lora'")
            for key, q in params.items():
                q.requires_grad_(key not in frozen)
        for _, module in p.trainable:
            for q in module.parameters():
                q.requires_grad_(True)
        setattr(model, RECORD_ATTR, InjectionRecord(config, flags, frozen=tuple(frozen)))
        meshes = [spec.module.weight.device_mesh for spec in p.layers if is_dtensor(spec.module.weight)]
        if meshes:  # FSDP2 does not manage the new adapters: their gradients averaged across its ranks
            dist_helpers.average_over_mesh([q for _, layer in adapted_layers(model)
                                            for q in layer.adapter_parameters().values() if q.requires_grad], meshes)
    except BaseException:
        journal.rollback()
        raise
