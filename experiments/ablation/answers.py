"""Scoring a generated answer: extract it with a pattern, normalize, compare (``exact_match``).

- Extraction: ``answer_pattern`` is a regex whose first group is the answer (``re.search`` over the whole
  generation); without one, the answer is the generation's first line (after leading whitespace). A
  generation the pattern does not match counts as wrong, never as an error.
- Normalization: surrounding whitespace and trailing punctuation (``.,;:!?``) removed, case folded.
- Comparison: the reference may list alternatives separated by ``|`` (so a reference answer cannot itself
  contain ``|``); two strings that both read as numbers compare as numbers (``1,000`` == ``1000.0``; commas
  only as thousands separators).
"""

from __future__ import annotations

import math
import re

TRAILING = ".,;:!?"
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")


def compile_pattern(pattern: str | None) -> re.Pattern | None:
    """``ValueError`` naming the problem unless ``pattern`` is a valid regex with at least one group."""
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"answer_pattern {pattern!r} is not a valid regular expression: {exc}") from None
    if rx.groups < 1:
        raise ValueError(f"answer_pattern {pattern!r} has no group; put the answer in parentheses, e.g. "
                         r"'#### (\S+)'")
    return rx


def extract(text: str, pattern: re.Pattern | None) -> str | None:
    """The answer in a generation, or ``None`` when the pattern does not match."""
    if pattern is None:
        lines = text.lstrip().splitlines()
        return lines[0] if lines else ""
    m = pattern.search(text)
    return None if m is None or m.group(1) is None else m.group(1)


def normalize(s: str) -> str:
    return s.strip().rstrip(TRAILING).strip().casefold()


def as_number(s: str) -> float | None:
    if not _NUMBER.fullmatch(s):
        return None
    return float(s.replace(",", ""))


def matches(prediction: str | None, answer: str) -> bool:
    """Whether an extracted ``prediction`` equals the reference ``answer`` (or one of its ``|`` alternatives)."""
    if prediction is None:
        return False
    p = normalize(prediction)
    pn = as_number(p)
    for alt in answer.split("|"):
        a = normalize(alt)
        an = as_number(a)
        if pn is not None and an is not None:
            if math.isclose(pn, an, rel_tol=1e-9, abs_tol=1e-12):
                return True
        elif p == a:
            return True
    return False
