"""Scoring a generated answer: extract it with a pattern, normalize, compare (``exact_match``).

- Extraction: ``answer_pattern`` is a regex whose first group is the answer (``re.search`` over the whole
  generation); without one, the answer is the generation's first line (after leading whitespace). A
  generation the pattern does not match counts as wrong, never as an error.
- Normalization: surrounding whitespace and trailing punctuation (``.,;:!?``) removed, case folded.
- Comparison (``compare = "exact"``, the default): the reference may list alternatives separated by ``|`` (so
  a reference answer cannot itself contain ``|``); two strings that both read as numbers compare as numbers
  (``1,000`` == ``1000.0``; commas only as thousands separators).
- ``compare = "math-verify"``: both sides parsed as mathematics and compared by Hugging Face's maintained
  verifier (the ``math-verify`` package: LaTeX and plain expressions, ``\\boxed{}``, ``1,000`` == ``1000``,
  ``3.0`` == ``3``, ``\\frac{1}{2}`` == ``0.5``; its ``verify(gold, prediction)`` is not symmetric: the reference
  is the gold). Extraction: with an ``answer_pattern``, its first group is what gets parsed; without one, the
  whole generation goes to math-verify's own extraction (the boxed answer first, else the last expression
  it finds), not the first line. A generation with nothing it can parse counts as wrong.
"""

from __future__ import annotations

import math
import re

TRAILING = ".,;:!?"
COMPARE = ("exact", "math-verify")
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


def check_compare(compare: str) -> str:
    """``ValueError`` naming the choices unless ``compare`` is one of :data:`COMPARE` (and, for math-verify,
    the package is installed)."""
    if compare not in COMPARE:
        raise ValueError(f"answer_compare must be one of {list(COMPARE)}, got {compare!r}")
    if compare == "math-verify":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ValueError("answer_compare = 'math-verify' needs the math-verify package: "
                             "pip install 'lowrank[experiments]' (or math-verify)") from None
    return compare


def correct(text: str, answer: str, pattern: re.Pattern | None, compare: str = "exact") -> bool:
    """Whether the generation ``text`` answers ``answer``: extraction and comparison as the module says."""
    if compare == "exact":
        return matches(extract(text, pattern), answer)
    if pattern is not None:
        text = extract(text, pattern)
        if text is None:
            return False
    return verifies(text, answer)


def verifies(prediction: str, answer: str) -> bool:
    """math-verify's verdict that ``prediction`` equals the reference ``answer`` (or one of its ``|``
    alternatives); nothing parseable in the prediction is wrong, never an error."""
    from math_verify import parse, verify

    pred = parse(prediction)
    if not pred:
        return False
    return any(verify(gold, pred) for gold in (parse(alt) for alt in answer.split("|")) if gold)


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
