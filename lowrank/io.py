"""Save and load adapters: safetensors for tensors, JSON for the config. No pickle.

A saved adapter (``lowrank_adapter.safetensors`` + ``lowrank_config.json`` in a directory)
holds, per layer, the trained ``A``, ``B`` and, for initializers that offset the base, the
initial ``A0``, ``B0``: with them :func:`load_adapter` rebuilds the fine-tuned model from the
*original* pretrained model (``W = W0 - s B0 A0``, recomputed bit for bit). It also holds the
parameters of ``config.trainable`` modules (e.g. a classifier head).

Writes are atomic (temporary file, fsync, rename), and the JSON records the SHA-256 of the
tensor file, so a partial or corrupted save is detected on load before the model is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ._version import __version__
from .weights import weight_shape
from .config import LoRAConfig, matches_targets, output_scale
from .plan import RECORD_ATTR, adapted_layers, check_untied, commit, find_trainable, plan, unwrap
from .registry import get_adapter

CONFIG_NAME = "lowrank_config.json"
WEIGHTS_NAME = "lowrank_adapter.safetensors"
PREV = ".prev"
"""Suffix of the previous pair, kept while a save is in progress."""
LOCK_NAME = ".lowrank.lock"
FORMAT = "lowrank-adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """A saved adapter is missing, corrupted, or does not fit the model."""


class _ChecksumMismatch(AdapterFileError):
    """The tensor file is not the one its config was written with (corruption, or a save cut between files)."""


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        frozen = sorted(k for k, q in layer.adapter_parameters().items() if not q.requires_grad)
        if frozen:  # e.g. MiCA's B: reloaded frozen whatever is installed where it is loaded
            layers[name]["frozen"] = frozen
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
    with _locked(out):
        _write_pair(out, blob, (json.dumps(meta, indent=2) + "\n").encode())
    return out


@contextmanager
def _locked(directory: Path, shared: bool = False):
    """An advisory lock on ``directory/.lowrank.lock`` (POSIX ``flock``): saves are serialized, reads wait for a
    save in progress. Where ``fcntl`` is missing (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = directory / LOCK_NAME
    try:  # a reader opens read-only and never creates the file (a folder it may not write, another user's lock)
        fd = os.open(lock, os.O_RDONLY) if shared else os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield  # no lock to wait for: a save in progress is still caught by the checksum and the .prev fallback
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pair_is_complete(cfg_path: Path, w_path: Path) -> bool:
    """Whether the weights file is the one its config's checksum names (a pair a save finished)."""
    try:
        meta = json.loads(cfg_path.read_text())
        return isinstance(meta, dict) and hashlib.sha256(w_path.read_bytes()).hexdigest() == meta.get("weights_sha256")
    except (OSError, ValueError, RecursionError):
        return False


def _write_pair(out: Path, blob: bytes, config: bytes) -> None:
    """Weights, then config (the commit point). The last complete pair stays readable throughout: it is
    hard-linked to ``*.prev`` first (only if it *is* complete: after a save cut between its two files, the
    ``*.prev`` pair from before is kept, so two failures in a row never lose it), and ``read_adapter`` falls
    back to it while the current pair is inconsistent."""
    prev = [(out / name, out / (name + PREV)) for name in (WEIGHTS_NAME, CONFIG_NAME)]
    (w_cur, w_old), (c_cur, c_old) = prev
    linked = _pair_is_complete(c_cur, w_cur)
    if linked:
        for cur, old in prev:
            old.unlink(missing_ok=True)
            os.link(cur, old)
    try:
        _atomic_write(w_cur, blob)
    except BaseException:  # nothing replaced: the current pair is still the complete one
        if linked:
            for _, old in prev:
                old.unlink(missing_ok=True)
        raise
    _atomic_write(c_cur, config)  # the commit point
    for _, old in prev:
        old.unlink(missing_ok=True)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a saved adapter: ``(metadata, tensors)``. Touches no model.

    If a save was interrupted between its two files (new weights beside the old config), the
    previous complete pair, kept as ``*.prev`` during the save, is read instead, with a warning."""
    d = Path(path)
    with _locked(d, shared=True) if d.is_dir() else nullcontext():
        return _read_with_fallback(d)


def _read_with_fallback(d: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        return _read_pair(d / CONFIG_NAME, d / WEIGHTS_NAME)
    except AdapterFileError as exc:
        old_cfg, old_w = d / (CONFIG_NAME + PREV), d / (WEIGHTS_NAME + PREV)
        if not isinstance(exc, _ChecksumMismatch) or not (old_cfg.is_file() and old_w.is_file()):
            raise
        out = _read_pair(old_cfg, old_w)
        import warnings

        warnings.warn(f"{d}: the last save was interrupted ({exc}); loaded the previous complete save from "
                      f"{old_cfg.name} and {old_w.name}", stacklevel=3)
        return out


def _read_pair(cfg_path: Path, w_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    d = cfg_path.parent
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterFileError(f"no adapter at {str(d)!r}: missing {p.name} (save one with lowrank.save_adapter)")
    meta = parse_json(cfg_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{cfg_path} is not a lowrank adapter config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterFileError(f"{cfg_path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{cfg_path} has format_version {meta['format_version']}; this lowrank "
                               f"({__version__}) reads up to {FORMAT_VERSION}: upgrade lowrank")
    blob = w_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise _ChecksumMismatch(f"{w_path} does not match its config's checksum: the file is corrupted or a save was "
                               f"interrupted; save the adapter again")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:  # pragma: no cover - the checksum catches it first
        raise AdapterFileError(f"{w_path} is corrupted: {exc}") from None
    _check_structure(meta, tensors, cfg_path, w_path)
    return meta, tensors


def parse_json(path: Path) -> Any:
    """A JSON file that is untrusted input: not UTF-8, not JSON, nested too deep (``RecursionError``) or with an
    integer too long to convert (``ValueError``) is an :class:`AdapterFileError`."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        what = "nested too deeply" if isinstance(exc, RecursionError) else f"not valid JSON: {exc}"
        raise AdapterFileError(f"{path} is corrupted ({what})") from None


def config_from_file(d: Any, cfg_path: Path, warn: bool = True) -> tuple[LoRAConfig, dict[str, Any] | None]:
    """The file's ``LoRAConfig`` and, when its initializer is not installed here, ``origin`` (its name and
    options, kept as metadata). Loading needs only the tensors (the offset factors ``A0``, ``B0`` are
    stored), so a missing initializer is a warning and the config is read with ``init="kaiming"``; a missing
    *adapter* cannot be rebuilt without its code and is an error naming it."""
    from .registry import ADAPTERS, INITIALIZERS

    if not isinstance(d, dict):
        raise AdapterFileError(f"{cfg_path}: invalid 'config': expected a mapping, got {type(d).__name__}")
    adapter = d.get("adapter", "lora")
    if isinstance(adapter, str) and adapter not in ADAPTERS:
        raise AdapterFileError(f"{cfg_path}: the adapter was made with the adapter layer {adapter!r}, which is not "
                               "installed here, and its tensors cannot be rebuilt without its code: install the package "
                               "that registers it (a 'lowrank.plugins' entry point) or import the module that defines "
                               f"it before loading (installed: {ADAPTERS.list()})")
    origin = None
    init = d.get("init", "kaiming")
    if isinstance(init, str) and init not in INITIALIZERS:
        origin = {k: d[k] for k in ("init", "init_options", "rank_budget") if k in d}  # written back by save
        d = {**d, "init": "kaiming", "init_options": {}, "rank_budget": None}
        if warn:
            import warnings

            warnings.warn(f"{cfg_path}: made with initializer {init!r}, which is not installed here; loading needs "
                          "only the saved tensors, so the adapter loads as saved (the name is kept in the model's "
                          "record and written again by save_adapter)", stacklevel=3)
    try:
        return LoRAConfig.from_dict(d), origin
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterFileError(f"{cfg_path}: invalid 'config': {exc}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_structure(meta: dict[str, Any], tensors: dict[str, torch.Tensor], cfg_path: Path, w_path: Path) -> None:
    """Every field a load relies on is present, typed and consistent; the tensor file holds exactly the
    tensors the config declares, floating point and finite. A file is untrusted input."""
    config, origin = config_from_file(meta.get("config"), cfg_path, warn=False)
    layers, trainable = meta.get("layers"), meta.get("trainable", [])
    if not isinstance(layers, dict) or not layers:
        raise AdapterFileError(f"{cfg_path}: 'layers' must be a non-empty mapping of layer name -> its shape and scale")
    if not isinstance(trainable, list) or not all(isinstance(t, str) for t in trainable):
        raise AdapterFileError(f"{cfg_path}: 'trainable' must be a list of module names")
    for name in trainable:
        if not (config.trainable and matches_targets(list(config.trainable), name)):
            raise AdapterFileError(f"{cfg_path}: trainable module {name!r} is not named by the config's trainable "
                                   f"{list(config.trainable)}")
        hit = next((n for n in layers if n == name or n.startswith(name + ".")), None)
        if hit is not None:
            raise AdapterFileError(f"{cfg_path}: trainable module {name!r} {'is' if hit == name else 'contains'} the "
                                   f"adapted layer {hit!r}; loading it would overwrite or unfreeze that layer's base "
                                   "weight. The file was edited or is corrupted")
    for pattern in config.trainable or ():  # the config's patterns too: load re-plans with them
        hit = next((n for n in layers if matches_targets([pattern], n)), None)
        if hit is not None:
            raise AdapterFileError(f"{cfg_path}: the config's trainable pattern {pattern!r} names the adapted layer "
                                   f"{hit!r}; loading would train that layer's base weight in full. The file was "
                                   "edited or is corrupted")
    adapter_cls = get_adapter(config.adapter)  # config_from_file checked it is installed
    expected = {k for name, info in layers.items()
                for k in _check_layer_info(config, origin, adapter_cls, name, info, tensors, cfg_path, w_path)}
    if config.allocates_ranks:  # ranks chosen by the initializer: within the bounds, summing to the budget
        ranks = {n: info["rank"] for n, info in layers.items()}
        total = config.rank_budget if config.rank_budget is not None else sum(config.rank_for(n) for n in layers)
        out = [n for n, r in ranks.items() if r < (config.rank_min or 1) or (config.rank_max is not None
                                                                              and r > config.rank_max)]
        if out or sum(ranks.values()) != total:
            raise AdapterFileError(f"{cfg_path}: allocated ranks {ranks} do not fit the config's budget {total} "
                                   f"(rank_min={config.rank_min}, rank_max={config.rank_max}); the file was edited or "
                                   "is corrupted")
    for key, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise AdapterFileError(f"{w_path}: tensor {key!r} is {t.dtype}; adapter tensors are floating point")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{w_path}: tensor {key!r} has non-finite values (NaN or inf)")
        if key.startswith("trainable."):
            if not any(key.startswith(f"trainable.{m}.") for m in trainable):
                raise AdapterFileError(f"{w_path}: tensor {key!r} belongs to no module of the file's trainable list "
                                       f"{trainable}; refusing to load it")
        elif key not in expected:
            raise AdapterFileError(f"{w_path}: unexpected tensor {key!r} (not declared by the config's layers)")


def _check_layer_info(config: LoRAConfig, origin, adapter_cls, name: str, info: Any, tensors: dict[str, torch.Tensor],
                      cfg_path: Path, w_path: Path) -> set[str]:
    """One layer's entry: typed fields, matched by the config, ``(rank, alpha, scaling)`` as the config (or, for a
    missing initializer, the file itself) gives them, and its tensors' shapes and dtypes; returns their keys."""
    expected: set[str] = set()
    where = f"{cfg_path}: layer {name!r}"
    if not isinstance(info, dict):
        raise AdapterFileError(f"{where}: expected a mapping, got {type(info).__name__}")
    for key, ok, what in (("rank", lambda v: _is_int(v) and v > 0, "a positive integer"),
                          ("d_out", lambda v: _is_int(v) and v > 0, "a positive integer"),
                          ("d_in", lambda v: _is_int(v) and v > 0, "a positive integer"),
                          ("offset", lambda v: isinstance(v, bool), "true or false"),
                          ("alpha", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) and v > 0, "a positive finite number"),
                          ("scaling", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) and v > 0, "a positive finite number"),
                          ("dtype", lambda v: isinstance(v, str), "a dtype name")):
        if key not in info or not ok(info[key]):
            raise AdapterFileError(f"{where}: {key} must be {what}, got {info.get(key, '<missing>')!r}")
    if "offset_rank" in info and not (info["offset"] and _is_int(info["offset_rank"]) and info["offset_rank"] > 0):
        raise AdapterFileError(f"{where}: offset_rank must be a positive integer on an offset layer, got "
                               f"{info['offset_rank']!r} (offset={info['offset']!r})")
    if not matches_targets(config.targets, name):
        raise AdapterFileError(f"{where} is not matched by the config's targets {config.targets!r}")
    shapes = adapter_cls.tensor_shapes(info)
    frozen = info.get("frozen", [])
    if not (isinstance(frozen, list) and all(isinstance(k, str) and k in shapes for k in frozen)):
        raise AdapterFileError(f"{where}: frozen must be a list of the layer's tensors {sorted(shapes)}, got {frozen!r}")
    rank = info["rank"] if config.allocates_ranks or origin else config.rank_for(name)  # allocated: below
    want = (rank, config.alpha_for(name, rank), config.scaling_for(name, rank))
    got = (info["rank"], info["alpha"], info["scaling"])
    if origin:  # the method's own rules (ranks, alphas) are not installed: the file's values, self-consistent
        want = (rank, got[1], output_scale(got[1], rank, config.scaling))
    if got[0] != want[0] or not math.isclose(got[1], want[1]) or not math.isclose(got[2], want[2], rel_tol=1e-9):
        raise AdapterFileError(f"{where}: (rank, alpha, scaling) = {got} but the file's config gives {want}; "
                               "the file was edited or is corrupted")
    for key, shape in adapter_cls.tensor_shapes(info).items():
        t = tensors.get(f"layers.{name}.{key}")
        got_shape = None if t is None else tuple(t.shape)
        if got_shape != shape:
            raise AdapterFileError(f"{w_path}: tensor {key} of layer {name!r} has shape {got_shape}, config says {shape}")
        if str(t.dtype).removeprefix("torch.") != info["dtype"]:
            raise AdapterFileError(f"{w_path}: tensor {key} of layer {name!r} is {t.dtype}, config says {info['dtype']}")
        expected.add(f"layers.{name}.{key}")
    return expected


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
        if "frozen" in meta["layers"][name]:  # the trainable/frozen state it was saved with
            for key, q in layer.adapter_parameters().items():
                q.requires_grad_(key not in meta["layers"][name]["frozen"])
    for mname in meta.get("trainable", []):
        for pname, p in model.get_submodule(mname).named_parameters():
            p.copy_(tensors[f"trainable.{mname}.{pname}"])
    return model
