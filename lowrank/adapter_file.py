"""A saved adapter read as untrusted input: the config's format and version, the tensor file's checksum, every field
a load relies on typed and consistent, the tensors exactly those the config declares (``AdapterFileError`` naming
what is wrong, before any model is touched)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from ._version import __version__
from .config import LoRAConfig, matches_targets, output_scale
from .registry import get_adapter

FORMAT = "lowrank-adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """A saved adapter is missing, corrupted, or does not fit the model."""


class _ChecksumMismatch(AdapterFileError):
    """The tensor file is not the one its config was written with (corruption, or a save cut between files)."""


def read_pair(cfg_path: Path, w_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
