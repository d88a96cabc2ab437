"""Run a lowrank initializer on an existing PEFT LoRA model, in place.

A PEFT user gets the paper-faithful LoRA-GA (or PiSSA, or their own registered method) without
leaving PEFT::

    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, ...))
    lowrank.peft.initialize(model, "lora_ga", data=batches)      # A, B and the base offset set
    ...train with PEFT as usual...

Each PEFT LoRA layer's ``lora_A`` / ``lora_B`` get the initializer's ``A``, ``B`` (cast to their
dtype); for methods that offset the base, the base weight becomes ``W0 - s B A`` (computed in
float32 from the cast factors, in the base layer's layout). The rank, alpha and scaling are
PEFT's. Atomic: on any error, weights are put back bit for bit.

As with PEFT's own LoRA-GA and PiSSA, an adapter saved by PEFT afterwards is relative to the
offset base; export it for the original base with ``lowrank.peft.export``'s exact rank-2r conversion.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..adapters.base import set_weight, weight_view
from ..config import LoRAConfig
from ..init.base import LayerContext
from ..inject import default_loss

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


@torch.no_grad()
def _commit(layers: Mapping[str, nn.Module], adapter: str, results: Mapping[str, Any]) -> None:
    saved = []
    try:
        for name, module in layers.items():
            res, base = results[name], module.get_base_layer()
            la, lb = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            saved.append((la, la.data.clone(), lb, lb.data.clone(), base, None))
            la.data.copy_(res.A.to(la.dtype))
            lb.data.copy_(res.B.to(lb.dtype))
            if res.offset:
                s = module.scaling[adapter]
                w = weight_view(base).float() - s * (lb.float() @ la.float())
                saved[-1] = saved[-1][:5] + (set_weight(base, w),)
    except BaseException:
        for la, a, lb, b, base, old in reversed(saved):
            la.data.copy_(a)
            lb.data.copy_(b)
            if old is not None:
                base.weight.data = old
        raise


def initialize(peft_model: nn.Module, init: str = "lora_ga", data: Iterable | None = None,
               loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, *, adapter_name: str = "default",
               init_options: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """Initialize every LoRA layer of ``peft_model`` (adapter ``adapter_name``) with the registered
    lowrank initializer ``init`` and return the model. ``data`` / ``loss_fn`` as for ``lowrank.inject``."""
    layers = _lora_layers(peft_model, adapter_name)
    peft_cfg = getattr(peft_model, "peft_config", {}).get(adapter_name)
    rslora = bool(getattr(peft_cfg, "use_rslora", False))
    ranks = {n: m.r[adapter_name] for n, m in layers.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoRAConfig(rank=r0, alpha=float(next(iter(layers.values())).lora_alpha[adapter_name]),
                        scaling="rslora" if rslora else "standard", targets=sorted(layers), init=init,
                        init_options=dict(init_options or {}), seed=seed)
    initializer = config.make_initializer()

    def context(name: str, stats=None) -> LayerContext:
        m = layers[name]
        return LayerContext(name, m.get_base_layer(), rank=m.r[adapter_name], alpha=float(m.lora_alpha[adapter_name]),
                            scaling=float(m.scaling[adapter_name]), config=config, stats=stats)

    for name in layers:
        initializer.check_layer(context(name))
    stats: dict[str, Any] = {}
    if initializer.uses_data:
        if data is None:
            raise ValueError(f"initializer {init!r} is data-driven: pass data=<iterable of batches> (and "
                             "loss_fn=lambda model, batch: <scalar loss> if model(**batch).loss is not your loss)")
        stats = initializer.collect(peft_model, {n: m.get_base_layer() for n, m in layers.items()}, data,
                                    loss_fn or default_loss)
    results = {}
    for name, module in layers.items():
        res = initializer.init_layer(context(name, stats.pop(name, None)))
        r, (m_, n_) = module.r[adapter_name], weight_view(module.get_base_layer()).shape
        if tuple(res.A.shape) != (r, n_) or tuple(res.B.shape) != (m_, r):
            raise ValueError(f"initializer {init!r} returned A {tuple(res.A.shape)}, B {tuple(res.B.shape)} for layer "
                             f"{name!r}; expected {(r, n_)}, {(m_, r)}")
        if not (torch.isfinite(res.A).all() and torch.isfinite(res.B).all()):
            raise FloatingPointError(f"initializer {init!r} returned non-finite values for layer {name!r}")
        results[name] = res
    _commit(layers, adapter_name, results)
    return peft_model
