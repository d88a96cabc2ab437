"""Intervals and verdicts over seeds (scipy).

- ``mean_ci``: mean with the 95% Student-t interval ``mean ± t_{0.975, n-1} sd / sqrt(n)``. With
  ``n = 3`` seeds ``t = 4.30``: the intervals are wide, and the tables print them rather than hide it.
- ``paired``: the same on per-seed differences (same seeds, hence the same batches and head init, for
  both arms); the verdict is ``"no difference"`` when the interval contains 0.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as _stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    @property
    def ci(self) -> list[float] | None:
        return None if math.isnan(self.lo) else [self.lo, self.hi]

    def fmt(self, spec: str = ".3f") -> str:
        if self.n == 0:
            return "n/a"
        if math.isnan(self.lo):
            return f"{self.mean:{spec}}"
        return f"{self.mean:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"


def mean_ci(values: list[float], level: float = LEVEL) -> Interval:
    """Mean and two-sided Student-t interval; ``lo = hi = nan`` with fewer than two values."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(vals)
    if n < 2:
        return Interval(m, math.nan, math.nan, n)
    half = _stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(vals) / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


def paired(arm: dict[int, float], reference: dict[int, float], level: float = LEVEL) -> Interval:
    """Interval of ``arm[seed] - reference[seed]`` over the seeds both have."""
    seeds = sorted(set(arm) & set(reference))
    return mean_ci([arm[s] - reference[s] for s in seeds], level)


def verdict(diff: Interval, higher_is_better: bool) -> str:
    """``better`` / ``worse`` when the interval excludes 0, else ``no difference``; ``n/a`` without an interval."""
    if diff.ci is None:
        return "n/a"
    if diff.lo > 0 or diff.hi < 0:
        return "better" if (diff.lo > 0) == higher_is_better else "worse"
    return "no difference"
