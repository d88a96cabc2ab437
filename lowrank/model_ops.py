"""Operations on an injected model: merge, unmerge, unload, and what is trainable."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .adapters.base import Adapter
from .weights import set_weight
from .plan import RECORD_ATTR, adapted_layers, shared_weight_users
from .weights import original_weight, set_module


def _layers(model: nn.Module) -> list[tuple[str, Adapter]]:
    layers = list(adapted_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no lowrank adapters; call lowrank.inject(model, config) first")
    return layers


def _check_untied(model: nn.Module, layers, what: str) -> None:
    for name, layer in layers:
        users = shared_weight_users(model, name, layer.base_layer)
        if users:
            raise ValueError(f"cannot {what} layer {name!r}: its weight is tied to {users[0]!r}, which would change too; "
                             f"untie it first (model.{name}.base_layer.weight = torch.nn.Parameter(<a clone>)), or "
                             "keep the adapter unmerged (lowrank.unload(model, merge=False))")


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, ``W <- W + s B A`` (float32 math, cast back)."""
    layers = _layers(model)
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"layer {merged[0]!r} is already merged; call lowrank.unmerge(model) first")
    _check_untied(model, layers, "merge")
    for _, layer in layers:
        layer.merge()
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, ``W <- W - s B A`` (exact in float32 up to rounding; approximate in bf16)."""
    layers = _layers(model)
    unmerged = [n for n, layer in layers if not layer.merged]
    if unmerged:
        raise ValueError(f"layer {unmerged[0]!r} is not merged; nothing to unmerge")
    for _, layer in layers:
        layer.unmerge()
    return model


@torch.no_grad()
def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the adapters and put plain base modules back.

    ``merge=True``: the base modules hold the fine-tuned weights ``W + s B A``.
    ``merge=False``: the original pretrained weights (for initializers that offset the base,
    ``W0 = W + s B0 A0``, exact up to one rounding of the weight's dtype).
    The ``requires_grad`` flags are restored to what they were before :func:`lowrank.inject`.
    """
    layers = _layers(model)
    if merge:
        _check_untied(model, [(n, layer) for n, layer in layers if not layer.merged], "merge")
    for name, layer in layers:
        if merge and not layer.merged:
            layer.merge()
        elif not merge:
            if layer.merged:
                layer.unmerge()
            if layer.offset:
                set_weight(layer.base_layer, original_weight(layer))
        set_module(model, name, layer.base_layer)
    record = getattr(model, RECORD_ATTR, None)
    if record is not None:
        for pname, p in model.named_parameters():
            if pname in record.requires_grad:
                p.requires_grad_(record.requires_grad[pname])
        delattr(model, RECORD_ATTR)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every parameter that requires grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def summary(model: nn.Module) -> str:
    """One line: trainable / total parameters, and the adapters by base layer type."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts: Counter[str] = Counter()
    adapter_params: Counter[str] = Counter()
    for _, layer in adapted_layers(model):
        kind = type(layer.base_layer).__name__
        counts[kind] += 1
        adapter_params[kind] += sum(p.numel() for p in layer.adapter_parameters().values())
    per_type = ", ".join(f"{counts[k]} x {k} ({adapter_params[k]:,})" for k in sorted(counts)) or "no adapters"
    other = trainable - sum(adapter_params.values())
    line = (f"trainable {trainable:,} / {total:,} ({100.0 * trainable / max(total, 1):.2f}%) | "
            f"adapters: {per_type} | other trainable: {other:,}")
    ranks = rank_allocation(model)
    record = getattr(model, RECORD_ATTR, None)
    if ranks and record is not None and record.config.allocates_ranks:
        line += (f" | ranks allocated by {record.config.init!r}: sum {sum(ranks.values())} over {len(ranks)} layers, "
                 f"min {min(ranks.values())}, max {max(ranks.values())} (lowrank.rank_allocation(model) per layer)")
    return line


def rank_allocation(model: nn.Module) -> dict[str, int]:
    """``{layer name: rank}`` of every adapter (the allocation, when an initializer chose the ranks)."""
    return {name: layer.rank for name, layer in adapted_layers(model)}
