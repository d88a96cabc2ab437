"""Intervals and verdicts over seeds (scipy).

- ``mean_ci``: mean with the 95% Student-t interval ``mean ± t_{0.975, n-1} sd / sqrt(n)``. With
  ``n = 3`` seeds ``t = 4.30``: the intervals are wide, and the tables print them rather than hide it.
- ``paired``: the same on per-seed differences (same seeds, hence the same batches and head init, for
  both arms); the verdict is ``"no difference"`` when the interval contains 0.
- ``mdd``: the minimal detectable difference, the smallest true mean paired difference that the paired
  two-sided t-test at level 0.05 rejects with probability 0.8, given the observed standard deviation ``s``
  of the per-seed differences and ``n`` seeds: the ``delta`` solving
  ``P(|T| > t_{0.975, n-1}) = 0.8`` for ``T`` noncentral t with ``n - 1`` degrees of freedom and noncentrality
  ``delta sqrt(n) / s`` (Cohen 1988, ch. 2). It says how large a difference the design could have seen; it
  uses ``s`` as if it were the true standard deviation, which with 3 seeds is itself uncertain.
- ``equivalence``: with a margin ``m``, ``"equivalent"`` when the 95% paired interval lies inside ``(-m, m)``
  (two one-sided tests, each at level 0.025: stricter than the usual 90% interval), else ``"better"`` /
  ``"worse"`` when it excludes 0, else ``"undecided"``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import integrate as _integrate
from scipy import optimize as _optimize
from scipy import stats as _stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int
    sd: float = math.nan
    """Standard deviation of the values (nan with fewer than two)."""

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
    sd = statistics.stdev(vals)
    half = _stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n, sd)


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


POWER = 0.8


def power(delta: float, sd: float, n: int, level: float = LEVEL) -> float:
    """Probability that the two-sided paired t-test at ``1 - level`` rejects when the true mean difference is
    ``delta`` and the differences' standard deviation ``sd``: the noncentral t's two tails beyond ``t_crit``
    (noncentrality ``nc = delta sqrt(n) / sd``); where scipy's ``nct`` returns nan (far tails) the same
    probability as one integral, ``E_V[Phi(nc - c) + Phi(-nc - c)]``, ``c = t_crit sqrt(V / (n - 1))``,
    ``V ~ chi2(n - 1)``."""
    df = n - 1
    tc = _stats.t.ppf(0.5 + level / 2, df)
    nc = abs(delta) * math.sqrt(n) / sd
    fast = float(_stats.nct.sf(tc, df, nc) + _stats.nct.cdf(-tc, df, nc))
    if math.isfinite(fast):
        return fast
    chi2 = _stats.chi2(df)

    def integrand(v: float) -> float:
        c = tc * math.sqrt(v / df)
        return (_stats.norm.cdf(nc - c) + _stats.norm.cdf(-nc - c)) * chi2.pdf(v)

    lo, hi = chi2.ppf(1e-12), chi2.ppf(1 - 1e-12)
    return float(min(1.0, _integrate.quad(integrand, lo, hi, epsabs=1e-10, limit=200)[0]))


def mdd(diff: Interval, target: float = POWER, level: float = LEVEL) -> float:
    """Minimal detectable difference of a paired interval (module docstring); nan with fewer than two seeds,
    0 when every seed gave the same difference."""
    n, sd = diff.n, diff.sd
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    hi = sd
    while power(hi, sd, n, level) < target:
        hi *= 2
    return float(_optimize.brentq(lambda d: power(d, sd, n, level) - target, 0.0, hi, xtol=1e-12 * hi))


def equivalence(diff: Interval, margin: float, higher_is_better: bool) -> str:
    """``equivalent`` / ``better`` / ``worse`` / ``undecided`` for a margin (module docstring); ``n/a`` without
    an interval."""
    if diff.ci is None:
        return "n/a"
    if -margin < diff.lo and diff.hi < margin:
        return "equivalent"
    v = verdict(diff, higher_is_better)
    return "undecided" if v == "no difference" else v
