"""Run a lowrank initializer on an existing PEFT LoRA model, in place.

A PEFT user gets the paper-faithful LoRA-GA (or PiSSA, or their own registered method) without
leaving PEFT::

    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, ...))
    lowrank.peft.initialize(model, "lora_ga", data=batches)      # A, B and the base offset set
    ...train with PEFT as usual...

Each PEFT LoRA layer's ``lora_A`` / ``lora_B`` get the initializer's ``A``, ``B`` (cast to their
dtype); for methods that offset the base, the base weight becomes ``W0 - s B A`` (computed in
float32 from the cast factors, in the base layer's layout). The rank, alpha and scaling are
PEFT's. The same stops as ``lowrank.inject`` (``lowrank.plan``'s data-free checks, tied weights refused
before the data pass for a declared offset, ``lowrank.init.driver`` for statistics and factors, the
``lowrank.weights`` offset formula and journal); only the commit differs, because PEFT owns these layers:
lowrank writes into their ``lora_A`` / ``lora_B`` instead of swapping modules. Atomic: on any error,
weights are put back bit for bit.

**Saving.** For methods that offset the base, an adapter PEFT's ``save_pretrained`` writes is relative to
the offset base ``W0 - s B0 A0`` and does not reproduce the model on the original base (the model's
``save_pretrained`` warns). Save with ``lowrank.peft.export(model, directory)``: it writes the exact rank-2r
LoRA ``[A; A0]``, ``[B, -B0]`` on the original weights (``modules_to_save`` kept), which
``peft.PeftModel.from_pretrained(original_base, directory)`` loads with the trained model's outputs
(``initialize`` keeps ``A0``, ``B0`` on the model for this: ``lowrank.peft.native``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..weights import weight_view
from ..init.base import RankAllocation
from ..init.driver import LayerSpec, run_initializer
from ..plan import check_untied
from ..weights import Journal, offset_weight
from ..registry import get_initializer
from . import native

PEFT_PREFIX = "base_model.model."


def _lora_layers(peft_model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    layers = {}
    for name, module in peft_model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict) and adapter in lora_A:
            if getattr(module, "use_dora", {}).get(adapter):
                raise ValueError(f"layer {name!r} uses DoRA; lowrank initializers set plain LoRA factors")
            if not isinstance(lora_A[adapter], nn.Linear):
                raise ValueError(f"layer {name!r} is a {type(module).__name__} LoRA layer; lowrank initializes LoRA "
                                 "on nn.Linear and Conv1D base layers only")
            layers[name.removeprefix(PEFT_PREFIX)] = module
    if not layers:
        raise ValueError(f"no PEFT LoRA layers with adapter {adapter!r} in {type(peft_model).__name__}; pass the "
                         "model returned by peft.get_peft_model (or adapter_name=...)")
    return layers


def _check_untied(peft_model: nn.Module, specs: list[LayerSpec], init: str, results=None) -> None:
    """``lowrank.plan.check_untied`` on the PEFT model: the base layers under their full names there."""
    full = {id(m): n for n, m in peft_model.named_modules()}
    check_untied(peft_model, [replace(s, name=full[id(s.module)]) for s in specs], init, results)


@torch.no_grad()
def _commit(peft_model: nn.Module, layers: Mapping[str, nn.Module], adapter: str,
            results: Mapping[str, Any]) -> dict[str, tuple]:
    """Write the factors (and offsets); return ``{name: (A0, B0)}`` of the offset layers, as stored. On failure
    everything written is put back (``lowrank.weights.Journal``, as ``lowrank.plan.commit`` does)."""
    journal, initial = Journal(peft_model), {}
    try:
        for name, module in layers.items():
            res, base = results[name], module.get_base_layer()
            if res.offset_factors is not None:
                raise ValueError(f"layer {name!r}: this initializer offsets the base by other factors than the ones "
                                 "it starts the adapter at (LoftQ); PEFT's layers cannot record that. Use "
                                 "lowrank.inject, then lowrank.peft.export")
            la, lb = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            journal.copy_into(la, res.A.to(la.dtype))
            journal.copy_into(lb, res.B.to(lb.dtype))
            if res.offset:  # from the factors as cast, the same formula as lowrank's own layers
                try:
                    journal.replaced_weight(base, offset_weight(base, weight_view(base), la, lb,
                                                                module.scaling[adapter]))
                except FloatingPointError as exc:
                    raise FloatingPointError(f"layer {name!r}: {exc}") from None
                initial[name] = (la.detach().clone(), lb.detach().clone())
    except BaseException:
        journal.rollback()
        raise
    return initial


def initialize(peft_model: nn.Module, init: str = "lora_ga", data: Iterable | None = None,
               loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, *, adapter_name: str = "default",
               init_options: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """Initialize every LoRA layer of ``peft_model`` (adapter ``adapter_name``) with the registered
    lowrank initializer ``init`` and return the model. ``data`` / ``loss_fn`` as for ``lowrank.inject``;
    under torch.distributed the statistics are all-reduced and the factors broadcast from rank 0, as
    ``inject`` does (one driver: ``lowrank.init.driver``)."""
    layers = _lora_layers(peft_model, adapter_name)
    done = native.records(peft_model).get(adapter_name)
    if done is not None and done.initial:
        raise ValueError(f"adapter {adapter_name!r} was already initialized with {done.init!r}, which offset its base "
                         "weights; a second initialize would offset them again. Start from a fresh "
                         "peft.get_peft_model(original_base, config)")
    initializer = get_initializer(init)(**dict(init_options or {}))
    if "factors" not in initializer.adapter_kinds:
        raise ValueError(f"initializer {init!r} initializes {list(initializer.adapter_kinds)} adapters, not PEFT's "
                         "LoRA factors")
    if isinstance(initializer, RankAllocation) and initializer.allocates():
        raise ValueError(f"initializer {init!r} with these options allocates per-layer ranks, but a PEFT model's LoRA "
                         "layers are already built with theirs; pass options that keep the ranks (eva: rho=1, gora: "
                         "allocate_ranks=False), or allocate with lowrank.inject and lowrank.peft.export")
    specs = [LayerSpec(n, m.get_base_layer(), m.r[adapter_name], float(m.lora_alpha[adapter_name]),
                       float(m.scaling[adapter_name])) for n, m in layers.items()]
    if initializer.offset:  # declared: tied weights are refused before the data pass, as lowrank.plan does
        _check_untied(peft_model, specs, init)
    results = run_initializer(initializer, specs, seed=seed, model=peft_model, data=data, loss_fn=loss_fn)
    _check_untied(peft_model, specs, init, results)
    initial = _commit(peft_model, layers, adapter_name, dict(zip(layers, results)))
    native.remember(peft_model, adapter_name, native.PeftInitRecord(init, dict(init_options or {}), initial))
    return peft_model
