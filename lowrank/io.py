"""Save and load adapters: safetensors for tensors, JSON for the config. No pickle.

A saved adapter (``lowrank_adapter.safetensors`` + ``lowrank_config.json`` in a directory)
holds, per layer, the trained ``A``, ``B`` and, for initializers that offset the base, the
initial ``A0``, ``B0``: with them :func:`load_adapter` rebuilds the fine-tuned model from the
*original* pretrained model (``W = W0 - s B0 A0``, recomputed bit for bit). It also holds the
parameters of ``config.trainable`` modules (e.g. a classifier head).

Writes are atomic (temporary file, fsync, rename: ``lowrank.storage``), and the JSON records the SHA-256 of
the tensor file, so a partial or corrupted save is detected on load before the model is touched (the file is
validated as untrusted input by ``lowrank.adapter_file``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from ._version import __version__
from .adapter_file import (FORMAT, FORMAT_VERSION, AdapterFileError, _ChecksumMismatch, config_from_file,  # noqa: F401
                           parse_json, read_pair)
from .plan import RECORD_ATTR, adapted_layers, check_untied, commit, find_trainable, plan, unwrap
from .registry import get_adapter
from .storage import CONFIG_NAME, LOCK_NAME, PREV, WEIGHTS_NAME, locked, write_pair  # noqa: F401
from .weights import weight_shape


def _record(model: nn.Module):
    record = getattr(model, RECORD_ATTR, None)
    if record is None:
        raise ValueError(f"{type(model).__name__} has no lowrank adapters; call lowrank.inject(model, config) first")
    return record


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapters (and ``trainable`` modules) to the directory ``path``.

    A ``torch.compile`` / ``DataParallel`` / DDP wrapper is unwrapped first, so the file loads into the plain
    model. Saves into one directory are serialized by a lock file (two processes, e.g. every rank of a
    ``torchrun`` job, never collide; the last complete save wins; saving from rank 0 only avoids the
    redundant writes). A save cut short at any point leaves the last complete pair readable."""
    model = unwrap(model)
    record = _record(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in adapted_layers(model):
        own = layer.tensors()
        layers[name] = {"rank": layer.rank, "alpha": layer.alpha, "scaling": layer.scaling, "d_out": layer.d_out,
                        "d_in": layer.d_in, "offset": layer.offset,
                        "dtype": str(next(iter(own.values())).dtype).removeprefix("torch.")}
        if layer.offset and layer.A0.shape[0] != layer.rank:  # a chain's record of the links it merged
            layers[name]["offset_rank"] = int(layer.A0.shape[0])
        layers[name].update(layer.layer_info())
        if record.frozen:  # the initializer's fixed factors (MiCA's B): reloaded frozen whatever is installed
            layers[name]["frozen"] = sorted(record.frozen)
        for key, t in own.items():
            tensors[f"layers.{name}.{key}"] = t.detach()
    trainable = [n for n, _ in find_trainable(model, record.config.trainable, [])]
    for mname in trainable:
        for pname, p in model.get_submodule(mname).named_parameters():
            tensors[f"trainable.{mname}.{pname}"] = p.detach()
    blob = st_save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "lowrank_version": __version__,
            "config": {**record.config.to_dict(), **(record.origin or {})}, "layers": layers, "trainable": trainable,
            "weights_sha256": hashlib.sha256(blob).hexdigest()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        write_pair(out, blob, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a saved adapter: ``(metadata, tensors)``. Touches no model.

    If a save was interrupted between its two files (new weights beside the old config), the
    previous complete pair, kept as ``*.prev`` during the save, is read instead, with a warning."""
    d = Path(path)
    with locked(d, shared=True) if d.is_dir() else nullcontext():
        return _read_with_fallback(d)


def _read_with_fallback(d: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        return read_pair(d / CONFIG_NAME, d / WEIGHTS_NAME)
    except AdapterFileError as exc:
        old_cfg, old_w = d / (CONFIG_NAME + PREV), d / (WEIGHTS_NAME + PREV)
        if not isinstance(exc, _ChecksumMismatch) or not (old_cfg.is_file() and old_w.is_file()):
            raise
        out = read_pair(old_cfg, old_w)
        import warnings

        warnings.warn(f"{d}: the last save was interrupted ({exc}); loaded the previous complete save from "
                      f"{old_cfg.name} and {old_w.name}", stacklevel=3)
        return out


def _check_fit(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
               modules: dict[str, nn.Module]) -> None:
    """Raise naming the first layer or tensor of the adapter that does not fit ``model``."""
    saved = meta["layers"]
    missing = [n for n in saved if n not in modules]
    extra = [n for n in modules if n not in saved]
    if missing or extra:
        what = (f"layer {missing[0]!r} of the adapter is not a target in the model" if missing
                else f"model layer {extra[0]!r} is a target but the adapter has no weights for it")
        raise AdapterFileError(f"adapter does not fit {type(model).__name__}: {what}")
    for name, info in saved.items():
        shape = weight_shape(modules[name])
        if shape != (info["d_out"], info["d_in"]):
            raise AdapterFileError(f"adapter does not fit layer {name!r}: adapter (d_out, d_in) = "
                                   f"{(info['d_out'], info['d_in'])}, model {shape}")
    for mname in meta.get("trainable", []):
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            raise AdapterFileError(f"adapter has trainable module {mname!r} that the model lacks") from None
        for pname, p in module.named_parameters():
            t = tensors.get(f"trainable.{mname}.{pname}")
            if t is None:
                raise AdapterFileError(f"adapter has no tensor for trainable parameter {mname}.{pname}")
            if p.shape != t.shape:
                raise AdapterFileError(f"trainable parameter {mname}.{pname}: adapter {tuple(t.shape)}, "
                                       f"model {tuple(p.shape)}")
    declared = {f"trainable.{m}.{pn}" for m in meta.get("trainable", []) for pn, _ in model.get_submodule(m).named_parameters()}
    extra = sorted(k for k in tensors if k.startswith("trainable.") and k not in declared)
    if extra:
        raise AdapterFileError(f"adapter tensor {extra[0]!r} is not a parameter of its trainable modules; refusing "
                               "to load it")


def _layer_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = f"layers.{name}."
    return {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into ``model`` and return it.

    ``model`` is either the *original* pretrained model (adapters are injected and the base
    offset rebuilt, reproducing the fine-tuned model) or a model already injected with the
    same layout (weights are replaced, e.g. to resume). Everything is verified before the model
    is changed; on any mismatch it is left as it was. A ``torch.compile`` / ``DataParallel`` wrapper is
    unwrapped (the adapters go into the model it wraps).
    """
    model = unwrap(model)
    meta, tensors = read_adapter(path)
    config, origin = config_from_file(meta["config"], Path(path) / CONFIG_NAME)
    layers = dict(adapted_layers(model))
    if layers:
        _check_fit(model, meta, tensors, {n: layer.base_layer for n, layer in layers.items()})
        if any(layer.merged for layer in layers.values()):
            raise AdapterFileError("the model's adapters are merged; call lowrank.unmerge(model) before loading")
        for name, layer in layers.items():
            info = meta["layers"][name]
            if layer.registry_name != config.adapter:
                raise AdapterFileError(f"layer {name!r}: the file holds a {config.adapter!r} adapter, the model has a "
                                       f"{layer.registry_name!r} adapter; load into the original model instead")
            if (layer.rank, layer.offset) != (info["rank"], info["offset"]):
                raise AdapterFileError(f"layer {name!r}: adapter has rank {info['rank']} (offset={info['offset']}), "
                                       f"model has rank {layer.rank} (offset={layer.offset})")
            if not (math.isclose(layer.alpha, info["alpha"]) and math.isclose(layer.scaling, info["scaling"],
                                                                              rel_tol=1e-9)):
                raise AdapterFileError(
                    f"layer {name!r}: the file's adapter has alpha {info['alpha']:g} (scaling {info['scaling']:.6g}), "
                    f"the model's has alpha {layer.alpha:g} (scaling {layer.scaling:.6g}); load into the original "
                    "model (the file's config is then used), or inject with the file's alpha and scaling")
    else:
        try:  # what the file's config asks of this model (targets, trainable modules, ...)
            p = plan(model, config, ranks={n: info["rank"] for n, info in meta["layers"].items()}, initializer=False)
        except (ValueError, TypeError) as exc:
            raise AdapterFileError(f"{Path(path) / CONFIG_NAME}: the file's config does not fit "
                                   f"{type(model).__name__}: {exc}") from exc
        if config.allocates_ranks:  # a target allocated rank 0 has no adapter (heterolora) and is not in the file
            p = p.with_layers([s for s in p.layers if s.name in meta["layers"]])
        _check_fit(model, meta, tensors, {s.name: s.module for s in p.layers})
        # the file's alphas and scales (checked against the method's rules when it is installed)
        p = p.with_layers([replace(s, alpha=float(meta["layers"][s.name]["alpha"]),
                                   scaling=float(meta["layers"][s.name]["scaling"])) for s in p.layers])
        adapter_cls = get_adapter(config.adapter)
        results = [adapter_cls.init_result(_layer_tensors(tensors, s.name)) for s in p.layers]
        check_untied(model, p.layers, config.init, results)
        commit(p, results)
        getattr(model, RECORD_ATTR).origin = origin
        layers = dict(adapted_layers(model))
    for name, layer in layers.items():
        layer.load_tensors(_layer_tensors(tensors, name))
        if "frozen" in meta["layers"][name]:  # the initializer's fixed factors, as saved
            frozen = meta["layers"][name]["frozen"]
            getattr(model, RECORD_ATTR).frozen = tuple(frozen)
            for key, q in layer.adapter_parameters().items():
                q.requires_grad_(key not in frozen)
    for mname in meta.get("trainable", []):
        for pname, p in model.get_submodule(mname).named_parameters():
            p.copy_(tensors[f"trainable.{mname}.{pname}"])
    return model
