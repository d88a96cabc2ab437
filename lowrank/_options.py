"""Validation of plug-in options (``init_options``, preconditioner options)."""

from __future__ import annotations

import dataclasses
from typing import Any


def build_options(options_cls: type, options: dict[str, Any], kind: str, name: str) -> Any:
    """Instantiate the plug-in's frozen ``Options`` dataclass; unknown keys list the valid ones."""
    valid = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {kind} {name!r}; valid options: {valid or 'none'}")
    return options_cls(**options)
