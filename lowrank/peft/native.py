"""PEFT models that ``lowrank.peft.initialize`` initialized: what it records, how they are saved.

An offset initializer (LoRA-GA, PiSSA, ...) rewrites each PEFT base weight as ``W = W0 - s B0 A0``. PEFT's
``save_pretrained`` then writes an adapter relative to ``W``: loaded onto the original base ``W0`` it gives
other outputs. ``initialize`` therefore keeps ``(A0, B0)`` of every offset layer on the model
(``model._lowrank_peft_init[adapter_name]``) and wraps the model's ``save_pretrained`` so that it warns;
``lowrank.peft.export(peft_model, directory)`` writes the adapter for the original base: each offset
layer as the rank-``2r`` LoRA ``A' = [A; A0]``, ``B' = [B, -B0]`` with ``alpha'`` such that ``s' = s``
(``lowrank.peft.format.rank_2r``), every other tensor (other LoRA layers, ``modules_to_save``) as PEFT
saves it. ``PeftModel.from_pretrained(original_base, directory)`` then reproduces the trained model.
"""

from __future__ import annotations

import copy
import os
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


ATTR = "_lowrank_peft_init"


@dataclass
class PeftInitRecord:
    """What one ``initialize`` call did to one adapter of a PEFT model."""

    init: str
    init_options: dict[str, Any]
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Offset layers (base-model module names) -> ``(A0, B0)`` as initialized (copies)."""


def is_peft_model(model: nn.Module) -> bool:
    """A ``peft.PeftModel`` (a transformers model with ``add_adapter`` also has a ``peft_config``, but is not one)."""
    if not hasattr(model, "peft_config"):
        return False
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def records(model: nn.Module) -> dict[str, PeftInitRecord]:
    return model.__dict__.get(ATTR, {})


def remember(model: nn.Module, adapter: str, record: PeftInitRecord) -> None:
    """Keep ``record`` on the model and, for offset inits, make ``save_pretrained`` warn."""
    store = model.__dict__.setdefault(ATTR, {})
    store[adapter] = record
    if record.initial and "save_pretrained" not in model.__dict__:
        # a method bound to this model: a deepcopy rebinds it to the copy (and reads the copy's records)
        model.save_pretrained = types.MethodType(_warning_save_pretrained, model)


def _warning_save_pretrained(self, *args, **kwargs):
    """PEFT's ``save_pretrained``, after a warning that its adapter is for the offset base."""
    offset = [f"{a!r} ({r.init})" for a, r in records(self).items() if r.initial]
    if offset:
        warnings.warn(f"adapter(s) {', '.join(offset)} of this PEFT model were initialized by lowrank.peft.initialize "
                      "with an initializer that offset the base weights (W = W0 - s B0 A0): the adapter "
                      "save_pretrained writes is relative to the offset base and does not reproduce this model on "
                      "the original one. To save for the original base, use lowrank.peft.export(model, directory) "
                      "(the exact rank-2r conversion, modules_to_save kept)", UserWarning, stacklevel=2)
    return type(self).save_pretrained(self, *args, **kwargs)


def _plain(obj: Any) -> Any:
    """A PEFT config dict as JSON data (sets, e.g. ``target_modules``, as sorted lists; enums as their value)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(_plain(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "value") and not isinstance(obj, (str, int, float, bool)):
        return obj.value
    return obj


def export_peft_model(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``lowrank_export.json``) that load onto the
    *original* base model and reproduce ``model`` (a PEFT LoRA model initialized by lowrank, or by a PEFT init
    that leaves the base as it is)."""
    from peft.utils import get_peft_model_state_dict

    from .format import patterns, rank_2r, write_adapter

    if adapter_name not in model.peft_config:
        raise ValueError(f"the PEFT model has no adapter {adapter_name!r}; it has {sorted(model.peft_config)}")
    cfg = copy.deepcopy(model.peft_config[adapter_name])
    if getattr(cfg, "peft_type", None) is None or str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
        raise ValueError(f"adapter {adapter_name!r} is a {cfg.peft_type} adapter; lowrank exports PEFT LoRA adapters")
    record = records(model).get(adapter_name)
    own = cfg.init_lora_weights
    if record is None and own not in (True, False, "gaussian"):  # PEFT's own offset inits (pissa, olora, ...)
        raise ValueError(f"adapter {adapter_name!r} was initialized by PEFT itself (init_lora_weights={own!r}), which "
                         "may offset the base weights without lowrank knowing the initial factors; save it with PEFT's "
                         "save_pretrained(path_initial_model_for_weight_conversion=...) instead")
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    inner = model.base_model.model
    ranks, alphas = {}, {}
    for name, module in inner.named_modules():
        held = [getattr(module, k, None) for k in ("lora_A", "lora_embedding_A")]  # linear and embedding LoRA
        if not any(isinstance(h, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in h for h in held):
            continue
        r, alpha = module.r[adapter_name], float(module.lora_alpha[adapter_name])
        if record is not None and name in record.initial:
            A0, B0 = record.initial[name]
            ka, kb = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
            if ka not in state or kb not in state:
                raise ValueError(f"layer {name!r}: PEFT's state dict has no {ka!r}; the model changed after initialize")
            A, B, r, alpha = rank_2r(state[ka], state[kb], A0.cpu(), B0.cpu(), r, alpha, bool(cfg.use_rslora))
            state[ka], state[kb] = A.contiguous(), B.contiguous()
        ranks[name], alphas[name] = r, alpha
    if not ranks:
        raise ValueError(f"the PEFT model has no LoRA layers for adapter {adapter_name!r}")
    cfg.r, cfg.lora_alpha, cfg.rank_pattern, cfg.alpha_pattern = patterns(ranks, alphas)
    cfg.init_lora_weights = True  # the weights are loaded; no init to rerun on the original base
    if hasattr(cfg, "lora_ga_config"):
        cfg.lora_ga_config = None
    cfg.inference_mode = True
    return write_adapter(directory, state, _plain(cfg.to_dict()), {
        "from": "a PEFT model", "adapter_name": adapter_name, "init": record.init if record else None,
        "init_options": record.init_options if record else None,
        "rank_2r_conversion": sorted(record.initial) if record else []})
