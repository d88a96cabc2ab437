"""Export lowrank adapters as a PEFT adapter (LoRA, DoRA, or a tuner an adapter declares) for the *original*
base model.

For a layer whose base was offset at initialization (``W = W0 - s B0 A0``, e.g. LoRA-GA, PiSSA),
the trained ``(A, B)`` and the initial ``(A0, B0)`` are one rank-``2r`` LoRA on ``W0``::

    A' = [A; A0]   (2r, n)      B' = [B, -B0]   (m, 2r)
    alpha' = 2 alpha (s = alpha / r)   or   sqrt(2) alpha (rsLoRA, s = alpha / sqrt(r))

so ``s' = s`` and ``W0 + s' B' A' = W + s B A`` exactly (up to float rounding of ``W``).
Layers without an offset are exported as they are. A ``dora`` adapter is written as PEFT DoRA
(``use_dora``, the magnitude as ``lora_magnitude_vector``): PEFT's norm ``||W0 + s' B' A'||`` equals
lowrank's ``||W + s B A||``, so the conversion holds for DoRA too. Per-layer ranks and alphas become PEFT's
``rank_pattern`` / ``alpha_pattern`` (escaped full module names); ``config.trainable`` modules
become ``modules_to_save``. ``lowrank_export.json`` records the method that produced it.

Other adapters are written to a PEFT tuner of their own when the adapter class declares the format
(a format in :mod:`lowrank.peft.formats`), e.g. ``gralora`` as PEFT GraLoRA and ``randlora`` as
PEFT RandLoRA; the rest are refused.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..plan import RECORD_ATTR, adapted_layers, find_trainable, unwrap
from ..quant import is_4bit
from ..registry import get_adapter
from .format import (LOWRANK_NOTE, PEFT_CONFIG, PEFT_WEIGHTS, PREFIX, declares_peft_format, exact_key,  # noqa: F401
                     peft_format,
                     patterns, rank_2r, target_modules, write_adapter)
from .native import export_peft_model, is_peft_model


def _factors(layer, rslora: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(A', B', r', alpha')`` of one layer on the original base weight (from the adapter's saved tensors)."""
    t = layer.tensors()
    A, B = t["A"].detach(), t["B"].detach()
    if not layer.offset:
        return A, B, layer.rank, layer.alpha
    return rank_2r(A, B, t["A0"], t["B0"], layer.rank, layer.alpha, rslora)


def export(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``lowrank_export.json``).

    ``peft.PeftModel.from_pretrained(original_model, directory)`` then reproduces ``model``'s
    outputs. Raises before writing anything for what PEFT cannot represent (another adapter
    kind, merged adapters).

    ``model`` may also be a PEFT model that ``lowrank.peft.initialize`` initialized: its offset layers are
    written as the same rank-``2r`` LoRA on the original base (``modules_to_save`` kept; ``adapter_name``
    picks the PEFT adapter); see :func:`lowrank.peft.native.export_peft_model`.
    """
    model = unwrap(model)
    if is_peft_model(model):
        return export_peft_model(model, directory, adapter_name)
    record = getattr(model, RECORD_ATTR, None)
    layers = dict(adapted_layers(model))
    if record is None or not layers:
        raise ValueError(f"{type(model).__name__} has no lowrank adapters; call lowrank.inject(model, config) first")
    cfg = record.config
    adapter_cls = get_adapter(cfg.adapter)
    if cfg.adapter not in ("lora", "dora") and not declares_peft_format(adapter_cls):
        raise ValueError(f"adapter {cfg.adapter!r} cannot be exported to PEFT: PEFT has no such adapter (it "
                         "represents lowrank's 'lora' and 'dora' and the adapters that declare a PEFT format, "
                         "lowrank.peft.format); save it with lowrank.save_adapter instead")
    merged = [n for n, layer in layers.items() if getattr(layer, "merged", False)]
    if merged:
        raise ValueError(f"layer {merged[0]!r} is merged; call lowrank.unmerge(model) before exporting")
    if cfg.adapter not in ("lora", "dora"):
        return _export_declared(model, directory, layers, cfg, adapter_cls)
    _warn_quantized_offsets(layers)
    tensors, ranks, alphas, conv1d = _layer_tensors(layers, cfg)
    r0, a0, rank_pattern, alpha_pattern = patterns(ranks, alphas)
    saved_modules = _saved_modules(model, cfg, tensors)
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": r0, "lora_alpha": a0, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": target_modules(model, list(layers)), "use_rslora": cfg.scaling == "rslora",
        "fan_in_fan_out": conv1d, "init_lora_weights": True,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": saved_modules or None, "use_dora": cfg.adapter == "dora", "layers_to_transform": None,
        "layers_pattern": None,
    }
    return write_adapter(directory, tensors, config, {
        "init": cfg.init, "init_options": dict(cfg.init_options), "lowrank_config": cfg.to_dict(),
        "rank_2r_conversion": sorted(n for n, layer in layers.items() if layer.offset)})


def _warn_quantized_offsets(layers: dict) -> None:
    """An offset 4-bit base stores ``quant(W0 - s B0 A0)``; PEFT's rank-2r LoRA on the original 4-bit base computes
    ``W0 - s B0 A0`` exactly: the two differ by the quantization error of the residual (``lowrank.quant``)."""
    errors = {n: getattr(layer.base_layer, "quantization_error", None) for n, layer in layers.items()
              if layer.offset and is_4bit(layer.base_layer)}
    errors = {n: e for n, e in errors.items() if e is not None}
    if errors:
        worst = max(errors, key=errors.get)
        warnings.warn(f"{len(errors)} offset layer(s) have a 4-bit base that stores quant(W0 - s B0 A0): on the original "
                      f"4-bit model PEFT computes W0 - s B0 A0 + s B A, lowrank deq(quant(W0 - s B0 A0)) + s B A; they "
                      f"differ by the residual's quantization error (relative, largest {errors[worst]:.3g} at "
                      f"{worst!r}; lowrank.quantization_errors(model)). Use an init without offset for an exact "
                      "export, or ship the quantized residual base with the adapter", UserWarning, stacklevel=3)


def _layer_tensors(layers: dict, cfg) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float], bool]:
    """Each layer's PEFT tensors (rank-2r for offset layers), ranks and alphas, and PEFT's ``fan_in_fan_out``."""
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for name, layer in layers.items():
        A, B, r, alpha = _factors(layer, cfg.scaling == "rslora")
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous().cpu()
        if cfg.adapter == "dora":  # PEFT's key has no ".weight"; the norm of W0 + s' B' A' equals ours
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.tensors()["m"].detach().contiguous().cpu()
        ranks[name], alphas[name] = r, alpha
    return tensors, ranks, alphas, _fan_in_fan_out(layers)


def _fan_in_fan_out(layers: dict) -> bool:
    """PEFT's ``fan_in_fan_out``: whether the targets are ``Conv1D``s (one flag per adapter)."""
    from transformers.pytorch_utils import Conv1D

    fan_in_fan_out = {isinstance(layer.base_layer, Conv1D) for layer in layers.values()}
    if len(fan_in_fan_out) > 1:
        raise ValueError("PEFT's fan_in_fan_out is one flag per adapter: export nn.Linear and Conv1D targets "
                         "as two adapters (inject them with two configs)")
    return fan_in_fan_out.pop()


def _saved_modules(model: nn.Module, cfg, tensors: dict[str, torch.Tensor]) -> list[str]:
    """``config.trainable`` modules (PEFT's ``modules_to_save``); their parameters are added to ``tensors``."""
    saved_modules = []
    for name, module in find_trainable(model, cfg.trainable, []):
        saved_modules.append(name)
        for pname, p in module.named_parameters():
            tensors[f"{PREFIX}{name}.{pname}"] = p.detach().contiguous().cpu()
    return saved_modules


def _export_declared(model: nn.Module, directory, layers: dict, cfg, adapter_cls) -> Path:
    """An adapter with a PEFT format of its own (:mod:`lowrank.peft.formats`)."""
    fmt = peft_format(adapter_cls)
    per_layer, shared, fields = fmt.to_peft(layers, cfg)  # raises for what PEFT cannot hold
    fan_in_fan_out = _fan_in_fan_out(layers)
    tensors = {f"{PREFIX}{name}.{key}": t.detach().contiguous().cpu()
               for name, own in per_layer.items() for key, t in own.items()}
    tensors.update({f"base_model.{key}": t.detach().contiguous().cpu() for key, t in shared.items()})
    saved_modules = _saved_modules(model, cfg, tensors)
    config: dict[str, Any] = {
        "peft_type": fmt.peft_type, "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "bias": "none", "target_modules": target_modules(model, list(layers)),
        "fan_in_fan_out": fan_in_fan_out, "modules_to_save": saved_modules or None, "layers_to_transform": None,
        "layers_pattern": None, **fields}
    return write_adapter(directory, tensors, config, {
        "init": cfg.init, "init_options": dict(cfg.init_options), "lowrank_config": cfg.to_dict(),
        "rank_2r_conversion": []})
