"""Load a PEFT LoRA (or DoRA) adapter into a plain model as lowrank adapters, or an adapter of a PEFT tuner that
a lowrank adapter has a format for (:mod:`lowrank.peft.formats`; PEFT GraLoRA as ``gralora``,
PEFT RandLoRA as ``randlora``).

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (written by ``save_pretrained``
or ``lowrank.peft.export``). The adapted layers come from the saved tensors themselves, so
``target_modules`` patterns, ``layers_to_transform`` and ``rank_pattern`` need no
re-interpretation; alphas follow PEFT's ``alpha_pattern`` matching. Everything is checked
before the model changes (first mismatch named); on any error the model is as it was.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from ..weights import weight_shape
from ..adapters.lora import LoRALayer
from ..config import LoRAConfig
from ..inject import adapted_layers, inject
from ..adapter_file import AdapterFileError, parse_json
from .format import (PEFT_CONFIG, PEFT_WEIGHTS, PREFIX, adapter_for_peft_type, declares_peft_format, exact_key,
                     peft_format)

LORA_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
MAGNITUDE_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
UNSUPPORTED = {"lora_embedding_A": "LoRA on embeddings", "lora_embedding_B": "LoRA on embeddings",
               "lora_magnitude_vector": "DoRA", "lora_A.bias": "lora_bias", "lora_B.bias": "lora_bias"}


def _peft_alpha(pattern: dict[str, float], name: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value)
    return float(default)


def read_peft(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a PEFT adapter directory (LoRA, or a tuner a lowrank adapter declares);
    touches no model."""
    d = Path(directory)
    cfg_path, w_path = d / PEFT_CONFIG, d / PEFT_WEIGHTS
    if not cfg_path.is_file():
        raise AdapterFileError(f"no PEFT adapter at {str(d)!r}: missing {PEFT_CONFIG}")
    if not w_path.is_file():
        extra = " (only adapter_model.bin found: re-save it with safe_serialization=True)" \
            if (d / "adapter_model.bin").is_file() else ""
        raise AdapterFileError(f"no PEFT adapter weights at {str(d)!r}: missing {PEFT_WEIGHTS}{extra}")
    cfg = parse_json(cfg_path)
    peft_type = cfg.get("peft_type") if isinstance(cfg, dict) else None
    if peft_type != "LORA" and adapter_for_peft_type(peft_type) is None:
        raise AdapterFileError(f"{cfg_path} is not a PEFT LoRA adapter (peft_type={peft_type!r}); lowrank reads LORA "
                               f"and {_declared_types()}")
    if peft_type == "LORA":
        _check_lora_config(cfg, cfg_path)
    if cfg.get("bias", "none") != "none":
        raise AdapterFileError(f"{cfg_path}: bias={cfg['bias']!r} trains base biases; lowrank loads bias='none' only")
    try:
        tensors = st_load(w_path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{w_path} is corrupted or truncated: {exc}") from None
    if peft_type == "LORA":
        unsupported = {k: v for k, v in UNSUPPORTED.items() if not (cfg.get("use_dora") and k == "lora_magnitude_vector")}
        for key in tensors:
            for marker, what in unsupported.items():
                if marker in key:
                    raise AdapterFileError(f"{w_path}: tensor {key!r} is {what}, which lowrank LoRA cannot represent")
    return cfg, tensors


def _declared_types() -> list[str]:
    from ..registry import ADAPTERS, get_adapter

    return sorted(peft_format(get_adapter(n)).peft_type for n in ADAPTERS.list() if declares_peft_format(get_adapter(n)))


def _check_lora_config(cfg: dict, cfg_path: Path) -> None:
    """What a PEFT LoRA config may ask for that lowrank LoRA cannot represent."""
    if cfg.get("trainable_token_indices"):
        raise AdapterFileError(f"{cfg_path}: trainable_token_indices (PEFT's trainable tokens: a delta on chosen "
                               "embedding rows) cannot be loaded as lowrank LoRA; load this adapter with PEFT")
    for key, what in (("lora_bias", "lora_bias"),):
        if cfg.get(key):
            raise AdapterFileError(f"{cfg_path}: {what} adapters cannot be loaded as lowrank LoRA ({key}=true)")


def _split_tensors(tensors: dict[str, torch.Tensor], dora: bool, directory) -> tuple[dict, dict]:
    """``({layer: {"A", "B"[, "m"]}}, {modules_to_save parameter: tensor})`` from PEFT's flat state dict."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = LORA_KEY.match(key)
        mag = MAGNITUDE_KEY.match(key) if dora else None
        if m:
            factors.setdefault(m["name"], {})[m["which"]] = t
        elif mag:
            factors.setdefault(mag["name"], {})["m"] = t
        elif key.startswith(PREFIX):
            extra[key.removeprefix(PREFIX)] = t
        else:
            raise AdapterFileError(f"unexpected tensor {key!r} in the PEFT adapter")
    if not factors:
        raise AdapterFileError(f"{directory}: the adapter holds no lora_A/lora_B weights")
    return factors, extra


def _check_layer(model: nn.Module, modules: dict[str, nn.Module], name: str, ab: dict[str, torch.Tensor],
                 dora: bool) -> int:
    """The layer's rank, after checking its tensors are complete and fit the model's layer (first mismatch named)."""
    want = {"A", "B", "m"} if dora else {"A", "B"}
    if set(ab) != want:
        missing = sorted(want - set(ab))[0]
        raise AdapterFileError(f"layer {name!r}: the adapter lacks {'lora_magnitude_vector' if missing == 'm' else 'lora_' + missing}; "
                               "the file is partial")
    module = modules.get(name)
    if module is None:
        raise AdapterFileError(f"adapter layer {name!r} is not a module of {type(model).__name__} (first mismatch)")
    if not LoRALayer.supports(module):
        raise AdapterFileError(f"adapter layer {name!r} is a {type(module).__name__} in this model; lowrank LoRA "
                               "wraps nn.Linear and Conv1D")
    A, B = ab["A"], ab["B"]
    m_, n_ = weight_shape(module)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != (m_, n_):
        raise AdapterFileError(f"adapter layer {name!r} does not fit: lora_A {tuple(A.shape)}, lora_B "
                               f"{tuple(B.shape)}; the model's layer is (d_out, d_in) = {(m_, n_)} (first mismatch)")
    if dora and tuple(ab["m"].shape) != (m_,):
        raise AdapterFileError(f"adapter layer {name!r}: lora_magnitude_vector {tuple(ab['m'].shape)}, expected "
                               f"{(m_,)}")
    return A.shape[0]


def _check_extra(model: nn.Module, extra: dict[str, torch.Tensor]) -> None:
    for key, t in extra.items():
        try:
            p = model.get_parameter(key)
        except AttributeError:
            raise AdapterFileError(f"adapter tensor {key!r} (modules_to_save) has no parameter in "
                                   f"{type(model).__name__} (first mismatch)") from None
        if p.shape != t.shape:
            raise AdapterFileError(f"adapter tensor {key!r}: {tuple(t.shape)}, the model's {tuple(p.shape)}")


@torch.no_grad()
def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject lowrank adapters holding the PEFT adapter in ``directory`` into ``model`` (the base model
    the adapter was trained on, without adapters) and return it; outputs match the PEFT model's."""
    cfg, tensors = read_peft(directory)
    if any(True for _ in adapted_layers(model)):
        raise ValueError(f"{type(model).__name__} already has lowrank adapters; load a PEFT adapter into the plain "
                         "base model (lowrank.unload(model) first)")
    if cfg["peft_type"] != "LORA":
        return _load_declared(model, directory, cfg, tensors)
    dora = bool(cfg.get("use_dora"))
    factors, extra = _split_tensors(tensors, dora, directory)
    modules = dict(model.named_modules())
    ranks = {name: _check_layer(model, modules, name, ab, dora) for name, ab in factors.items()}
    alphas = {name: _peft_alpha(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8)) for name in factors}
    _check_extra(model, extra)
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = float(cfg.get("lora_alpha", 8))
    # exactly the named modules: one anchored regex (a name list would also match every dotted suffix, so a
    # top-level `proj` would pull in `head.proj`), and exact keys for the per-layer ranks and alphas
    config = LoRAConfig(
        rank=r0, alpha=a0, scaling="rslora" if cfg.get("use_rslora") else "standard",
        targets="^(?:" + "|".join(re.escape(n) for n in sorted(factors)) + ")$",
        rank_pattern={exact_key(n): r for n, r in ranks.items() if r != r0},
        alpha_pattern={exact_key(n): a for n, a in alphas.items() if a != a0},
        dropout=float(cfg.get("lora_dropout") or 0.0), init="kaiming", trainable=sorted({k.rsplit(".", 1)[0] for k in extra}),
        adapter="dora" if dora else "lora")
    inject(model, config, progress=False)  # atomic; shapes were checked above, so the copies below cannot fail
    for name, layer in adapted_layers(model):
        layer.load_tensors(factors[name])
    for key, t in extra.items():
        model.get_parameter(key).copy_(t)
    return model


def _split_declared(tensors: dict[str, torch.Tensor], prefix: str, directory) -> tuple[dict, dict, dict]:
    """``({layer: {key: tensor}}, {shared key: tensor}, {modules_to_save parameter: tensor})`` of a tuner whose
    tensor names start with ``prefix`` (``base_model.model.<layer>.<prefix>...``, shared: ``base_model.<prefix>...``)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        rest = key.removeprefix(PREFIX)
        at = rest.find("." + prefix)
        if key.startswith(PREFIX) and at > 0:
            layers.setdefault(rest[:at], {})[rest[at + 1:]] = t
        elif key.startswith(PREFIX):
            extra[rest] = t
        elif key.startswith("base_model." + prefix):
            shared[key.removeprefix("base_model.")] = t
        else:
            raise AdapterFileError(f"unexpected tensor {key!r} in the PEFT adapter")
    if not layers:
        raise AdapterFileError(f"{directory}: the adapter holds no {prefix}* layer tensors")
    return layers, shared, extra


def _load_declared(model: nn.Module, directory, cfg: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A PEFT tuner that a lowrank adapter has a format for (:mod:`lowrank.peft.formats`)."""
    adapter_cls = adapter_for_peft_type(cfg["peft_type"])
    fmt = peft_format(adapter_cls)
    layers, shared, extra = _split_declared(tensors, fmt.peft_prefix, directory)
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise AdapterFileError(f"adapter layer {name!r} is not a module of {type(model).__name__} (first mismatch)")
        if not adapter_cls.supports(modules[name]):
            raise AdapterFileError(f"adapter layer {name!r} is a {type(modules[name]).__name__} in this model; lowrank's "
                                   f"{adapter_cls.registry_name!r} wraps nn.Linear and Conv1D")
    layers = {name: layers[name] for name in modules if name in layers}  # the model's order: the first mismatch named
    shapes = {name: weight_shape(modules[name]) for name in layers}
    try:
        fields, own = fmt.from_peft(cfg, layers, shared, shapes)
        config = LoRAConfig(targets="^(?:" + "|".join(re.escape(n) for n in sorted(layers)) + ")$",
                            trainable=sorted({k.rsplit(".", 1)[0] for k in extra}), **fields)
    except ValueError as exc:
        raise AdapterFileError(f"{directory}: {exc}") from None
    for name, t in own.items():
        want = adapter_cls.tensor_shapes({"rank": config.rank_for(name), "d_out": shapes[name][0],
                                          "d_in": shapes[name][1], "offset": False})
        bad = [k for k in t if k not in want or tuple(t[k].shape) != tuple(want[k])]
        if bad:
            raise AdapterFileError(f"adapter layer {name!r} does not fit: {bad[0]} would be {tuple(t[bad[0]].shape)}, "
                                   f"the layer needs {want.get(bad[0])} (first mismatch)")
    _check_extra(model, extra)
    inject(model, config, progress=False)  # atomic; a layer the adapter's options do not fit is refused here
    for name, layer in adapted_layers(model):
        layer.load_tensors({**layer.tensors(), **own[name]})  # frozen tensors not in the file: as initialized
    for key, t in extra.items():
        model.get_parameter(key).copy_(t)
    return model
