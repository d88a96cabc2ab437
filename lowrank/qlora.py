"""Model-level operations on 4-bit bases: put QLoRA's ``Linear4bit`` under adapted layers
(:func:`quantize_base`, the last step of LoftQ) and report what quantizing an offset residual cost
(:func:`lowrank.quantization_errors`). The layer-level reading and writing of 4-bit weights is :mod:`lowrank.quant`."""

from __future__ import annotations

import torch
from torch import nn

from .plan import RECORD_ATTR, adapted_layers
from .quant import is_4bit, params4bit, relative_error, require_bitsandbytes, set_param


@torch.no_grad()
def quantization_errors(model: nn.Module) -> dict[str, float]:
    """For every adapted 4-bit layer whose weight lowrank wrote (an offset ``W0 - s B0 A0``, or
    :func:`quantize_base`): ``||W - deq(Q)||_F / ||W||_F`` with ``W`` the weight it quantized, the relative change
    of the effective weight the quantization caused (measured when it was written)."""
    return {name: float(layer.base_layer.quantization_error) for name, layer in adapted_layers(model)
            if is_4bit(layer.base_layer) and getattr(layer.base_layer, "quantization_error", None) is not None}


def _linear4bit(module: nn.Linear, quant_type: str, blocksize: int, compress_statistics: bool,
                compute_dtype: torch.dtype | None) -> nn.Module:
    """A ``Linear4bit`` holding ``quant(module.weight)`` (and the float bias), on the module's device."""
    bnb = require_bitsandbytes("lowrank.quantize_base")
    w = module.weight.detach()
    out = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                            compute_dtype=compute_dtype or w.dtype, compress_statistics=compress_statistics,
                            quant_type=quant_type, device=w.device)
    set_param(out, params4bit(w, out, blocksize=blocksize, compress_statistics=compress_statistics,
                              quant_type=quant_type))
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    out.quantization_error = relative_error(w, out)
    out.train(module.training)
    return out


def _required_quantization(config) -> dict:
    """The settings the config's initializer declares (``Initializer.quantization``; LoftQ's), or none when it
    declares none or is not installed here (an adapter loaded from a file)."""
    from .registry import INITIALIZERS

    if config.init not in INITIALIZERS:
        return {}
    return config.make_initializer().quantization() or {}


@torch.no_grad()
def quantize_base(model: nn.Module, *, quant_type: str | None = None, blocksize: int | None = None,
                  compress_statistics: bool | None = None, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapted layer's full-precision ``nn.Linear`` base by a bitsandbytes ``Linear4bit`` holding
    ``quant(W)`` (QLoRA's storage), in place; returns ``model``.

    The settings default to those the injected config's initializer declares (``Initializer.quantization``: LoftQ's,
    so the base quantizes to its ``Q_T`` bit for bit),
    else NF4, block size 64, no double quantization. ``W`` is the current base (offset included), so after
    ``inject(model, LoRAConfig(init="loftq"))`` the model computes LoftQ's ``deq(Q_T) + s B_T A_T``; each new layer
    records ``quantization_error = ||W - deq(Q)||_F / ||W||_F``. Merged layers, ``Conv1D`` bases and models
    without lowrank adapters are refused before anything changes."""
    record = getattr(model, RECORD_ATTR, None)
    layers = list(adapted_layers(model))
    if record is None or not layers:
        raise ValueError(f"{type(model).__name__} has no lowrank adapters; call lowrank.inject(model, config) first")
    opts = _required_quantization(record.config)
    quant_type = quant_type or opts.get("quant_type", "nf4")
    blocksize = blocksize or opts.get("blocksize", 64)
    compress_statistics = opts.get("compress_statistics", False) if compress_statistics is None else compress_statistics
    todo = []
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; call lowrank.unmerge(model) before quantize_base")
        if is_4bit(layer.base_layer):
            continue
        if type(layer.base_layer) is not nn.Linear:
            raise TypeError(f"layer {name!r} has a {type(layer.base_layer).__name__} base; quantize_base converts "
                            "nn.Linear bases only (bitsandbytes' Linear4bit); narrow the targets")
        todo.append(layer)
    new = [_linear4bit(layer.base_layer, quant_type, blocksize, compress_statistics, compute_dtype) for layer in todo]
    for layer, q in zip(todo, new):
        layer.base_layer = q
    return model
