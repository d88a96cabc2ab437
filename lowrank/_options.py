"""Validation of plug-in options (``init_options``, preconditioner options): one checker for every
plug-in's ``Options`` dataclass.

Each value is checked against its field's annotation before the dataclass is built: ``bool`` takes
only ``True``/``False``; ``int`` takes integers but not booleans; ``float`` takes finite numbers (not
booleans, not strings); ``str`` takes strings; ``X | None`` also takes ``None``. A plug-in's own
``__post_init__`` then checks ranges and choices. Every message names the option, the value and
what it must be.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
          type(None): "None"}


def _allowed(hint: Any) -> tuple[type, ...] | None:
    """The plain types an annotation admits, or None when it is not one this checker understands."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_allowed(a) for a in typing.get_args(hint)]
        return None if any(p is None for p in parts) else tuple(t for p in parts for t in p)
    if hint in _NAMES:
        return (hint,)
    return None


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True
        if t is str and isinstance(value, str):
            return True
        if t is type(None) and value is None:
            return True
    return False


def check_option(options_cls: type, key: str, value: Any, kind: str, name: str) -> None:
    """Raise ``ValueError`` if ``value`` does not fit the annotation of ``options_cls.key``."""
    hints = typing.get_type_hints(options_cls)
    allowed = _allowed(hints.get(key))
    if allowed is not None and not _fits(value, allowed):
        what = " or ".join(_NAMES[t] for t in allowed)
        raise ValueError(f"option {key}={value!r} of {kind} {name!r} must be {what}")


def build_options(options_cls: type, options: dict[str, Any], kind: str, name: str) -> Any:
    """Instantiate the plug-in's frozen ``Options`` dataclass; unknown keys list the valid ones; every
    value is type-checked against its annotation first (module docstring)."""
    valid = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {kind} {name!r}; valid options: {valid or 'none'}")
    for key, value in options.items():
        check_option(options_cls, key, value, kind, name)
    try:
        return options_cls(**options)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if f"{kind} {name!r}" not in msg:
            msg = f"{kind} {name!r}: {msg}"
        raise ValueError(msg) from None
