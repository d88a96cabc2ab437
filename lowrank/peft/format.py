"""PEFT's adapter format as lowrank writes it: file names, the rank-2r conversion of an offset layer, and
``rank_pattern`` / ``alpha_pattern`` keys that select exactly one layer. Shared by ``export`` (lowrank
models) and ``native`` (PEFT models that ``lowrank.peft.initialize`` initialized)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import save as st_save
from torch import nn

from .._version import __version__
from .formats import check_peft_tensors, peft_format  # noqa: F401 - check_peft_tensors re-exported

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LOWRANK_NOTE = "lowrank_export.json"
PREFIX = "base_model.model."


def rank_2r(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, rank: int, alpha: float,
            rslora: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The trained ``(A, B)`` on an offset base ``W0 - s B0 A0`` as one LoRA on ``W0``: ``A' = [A; A0]``,
    ``B' = [B, -B0]``, ``r' = r + R0`` (``2r`` for an offset initializer; a chain's record ``R0`` grows by every
    link it folded into the base) and ``alpha'`` such that ``s' = s`` (``2 alpha`` for ``s = alpha / r`` at
    ``R0 = r``, ``sqrt(2) alpha`` for rsLoRA's ``alpha / sqrt(r)``). ``rslora`` is the scaling rule, passed, never
    inferred from the numbers (at ``r = 1`` both rules give the same ``s`` but different ``alpha'``)."""
    total = rank + A0.shape[0]
    factor = math.sqrt(total / rank) if rslora else total / rank
    return torch.cat([A, A0.to(A)], dim=0), torch.cat([B, -B0.to(B)], dim=1), total, factor * alpha


def exact_key(name: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that selects exactly the module ``name``, under PEFT's rule
    (``re.match(rf"(.*\\.)?({key})$", module_name)``) and lowrank's (full path or dotted suffix) alike: the
    leading ``^`` stops a top-level ``proj`` from also matching ``head.proj``."""
    return "^" + re.escape(name)


def patterns(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """The most common rank and alpha as defaults, the others as ``rank_pattern`` / ``alpha_pattern`` with
    :func:`exact_key` keys."""
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    return (r0, a0, {exact_key(n): r for n, r in ranks.items() if r != r0},
            {exact_key(n): a for n, a in alphas.items() if a != a0})


def target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT ``target_modules`` that select exactly ``names``: the list of names, or, when one of them is a dotted
    suffix of a module that is not adapted (a list entry matches by suffix in PEFT), one anchored regex
    (PEFT full-matches a string)."""
    chosen = set(names)
    others = [n for n, _ in model.named_modules() if n and n not in chosen]
    if any(o.endswith("." + n) for o in others for n in chosen):
        return "(?:" + "|".join(re.escape(n) for n in sorted(chosen)) + ")"
    return sorted(chosen)


CONVERSION_NOTE = ("layers listed in rank_2r_conversion were offset at initialization (W = W0 - s B0 A0) and are "
                   "exported as the rank-2r LoRA [A; A0], [B, -B0] on the original W0")


def write_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                  note: dict[str, Any]) -> Path:
    """The three files of an export, each written atomically: the weights, PEFT's config, lowrank's note (who
    wrote it, from which method, which layers were converted)."""
    from ..storage import atomic_write

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PEFT_WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    atomic_write(out / PEFT_CONFIG, json.dumps(config, indent=2).encode())
    note = {"exported_by": f"lowrank {__version__}", **note, "note": CONVERSION_NOTE}
    atomic_write(out / LOWRANK_NOTE, json.dumps(note, indent=2, default=str).encode())
    return out


# -- adapters with a PEFT tuner of their own: lowrank.peft.formats --------------------------------------------


def declares_peft_format(adapter_cls: type) -> bool:
    """Whether PEFT holds ``adapter_cls`` as a tuner of its own (a format in :mod:`lowrank.peft.formats`)."""
    return peft_format(adapter_cls) is not None


def adapter_for_peft_type(peft_type: Any) -> type | None:
    """The registered adapter class whose PEFT format is ``peft_type`` (``None``: no lowrank adapter reads it)."""
    from ..registry import ADAPTERS, get_adapter

    hits = [get_adapter(n) for n in ADAPTERS.list()
            if declares_peft_format(get_adapter(n)) and peft_format(get_adapter(n)).peft_type == peft_type]
    return hits[0] if hits else None
