"""An arm against the reference: the interval its verdicts rest on, shared by the summary and the adaptive-seed
plan (``seeds = { adaptive = true, ... }``).

- :func:`difference`: the crossed seeds x examples interval when every paired seed of both arms kept per-example
  outcomes of the metric for the same examples (``verdicts.crossed``), else the paired t-interval over seeds.
- :func:`undecided`: whether the interval settles nothing yet: it contains 0, or with an equivalence margin it
  is neither inside ``(-m, m)`` nor clear of 0.
"""

from __future__ import annotations

import math
from typing import Any

from . import outcomes
from .verdicts import Interval, crossed, equivalence, paired, verdict


def difference(ok: list[dict[str, Any]], ref_ok: list[dict[str, Any]], metric: str) -> Interval:
    """``metric``'s test difference, arm minus reference, over the seeds both finished (records with status ok)."""
    by_example = _per_example(ok, ref_ok, metric)
    if by_example is not None:
        return crossed(*by_example)
    return paired({r["seed"]: r["test"][metric] for r in ok}, {r["seed"]: r["test"][metric] for r in ref_ok})


def undecided(diff: Interval, higher_is_better: bool, margin: float | None) -> bool:
    if diff.ci is None:
        return True
    if margin is not None:
        return equivalence(diff, margin, higher_is_better) == "undecided"
    return verdict(diff, higher_is_better) == "no difference"


def halfwidth(diff: Interval) -> float:
    return math.inf if diff.ci is None else (diff.hi - diff.lo) / 2


def reference_plan(cfg, plans, rank):
    """The reference arm's plan at ``rank`` (full fine-tuning, rank ``None``, is compared with its first rank)."""
    refs = [p for p in plans if p.arm == cfg.sweep.reference]
    same = [p for p in refs if p.rank == rank]
    return (same or refs or [None])[0]


def _per_example(ok, ref_ok, metric) -> tuple[dict, dict] | None:
    """Each seed's per-example outcomes of ``metric`` for the arm and the reference, when every paired seed
    of both kept them for the same examples in the same order (equal ``order`` fingerprints); else ``None`` (the
    seed-level interval is used)."""
    arm = {r["seed"]: r.get("test_outcomes", {}).get(metric) for r in ok}
    ref = {r["seed"]: r.get("test_outcomes", {}).get(metric) for r in ref_ok}
    seeds = sorted(set(arm) & set(ref))
    if len(seeds) < 2 or any(arm[s] is None or ref[s] is None for s in seeds):
        return None
    if len({arm[s]["n"] for s in seeds} | {ref[s]["n"] for s in seeds}) > 1:
        return None
    orders = {arm[s].get("order") for s in seeds} | {ref[s].get("order") for s in seeds}
    if len(orders) > 1 or None in orders:  # scored on other examples, or in another order: no pairing by position
        return None
    return ({s: outcomes.decode(arm[s]) for s in seeds}, {s: outcomes.decode(ref[s]) for s in seeds})
