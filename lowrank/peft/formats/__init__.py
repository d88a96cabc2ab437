"""PEFT formats of the lowrank adapters that PEFT holds as a tuner of its own (other than LoRA and DoRA, which
:mod:`lowrank.peft.export` writes as PEFT LoRA): one file per adapter, each a :class:`PeftFormat` registered for
that adapter class with :func:`register_peft_format`. The conversion lives here, beside the rest of the PEFT
interop, not in the layer's file; a subclass of an adapter does not inherit its format (it may change the math).

A format declares::

    adapter_class = GraLoRALayer   the lowrank adapter it converts (exactly that class)
    peft_type = "GRALORA"          PEFT's ``peft_type``
    peft_prefix = "gralora_"       the prefix of the tuner's tensor names (PEFT's ``BaseTuner.prefix``)
    to_peft(layers, config) -> ({layer: {key: tensor}}, {key: tensor}, {PEFT config field: value})
        per-layer tensors (written as ``base_model.model.<layer>.<key>``), tensors shared across layers
        (``base_model.<key>``) and the method's config fields; ``ValueError`` for what PEFT cannot hold
    from_peft(peft_config, layers, shared, shapes) -> ({LoRAConfig field: value}, {layer: tensors})
        the inverse; ``shapes`` is each layer's ``(d_out, d_in)`` in the model; a layer's tensors may leave out
        frozen ones its initializer rebuilds (RandLoRA's bases when PEFT did not save them)

An adapter of a user's own package may instead declare the same four members in its own class body.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, ClassVar

import torch

FORMATS: dict[type, type] = {}
_discovered = False


class PeftFormat:
    """Base of a PEFT format (module docstring)."""

    adapter_class: ClassVar[type]
    peft_type: ClassVar[str]
    peft_prefix: ClassVar[str]

    @classmethod
    def to_peft(cls, layers: dict[str, Any], config) -> tuple[dict, dict, dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]],
                  shared: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> tuple[dict, dict]:
        raise NotImplementedError


def register_peft_format(cls: type) -> type:
    """Register ``cls`` (a :class:`PeftFormat`) as the PEFT format of ``cls.adapter_class``."""
    for key in ("adapter_class", "peft_type", "peft_prefix"):
        if not hasattr(cls, key):
            raise TypeError(f"PEFT format {cls.__qualname__} must declare {key}")
    FORMATS[cls.adapter_class] = cls
    return cls


def peft_format(adapter_cls: type) -> Any:
    """The PEFT format of ``adapter_cls``: its registered :class:`PeftFormat`, or the class itself when it declares
    ``peft_type`` in its own body; ``None`` when PEFT holds it only as LoRA (or not at all)."""
    _discover()
    if adapter_cls in FORMATS:
        return FORMATS[adapter_cls]
    return adapter_cls if isinstance(vars(adapter_cls).get("peft_type"), str) else None


def _discover() -> None:
    """Import every format module of this package once (their ``@register_peft_format`` run)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{info.name}")


def check_peft_tensors(name: str, got: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]]) -> None:
    """The PEFT tensors of layer ``name`` are exactly ``want`` (names and shapes); ``ValueError`` naming the first
    mismatch."""
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"layer {name!r}: unexpected tensor {extra[0]!r} for this adapter's config")
    for key, shape in want.items():
        if key not in got:
            raise ValueError(f"layer {name!r}: the adapter lacks {key}; the file is partial")
        if tuple(got[key].shape) != tuple(shape):
            raise ValueError(f"layer {name!r}: {key} has shape {tuple(got[key].shape)}, the model's layer needs "
                             f"{tuple(shape)}")
