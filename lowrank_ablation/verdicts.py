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
- ``crossed``: with per-example outcomes (exact match, pass@1), the paired difference ``d[s, i]`` of seed ``s``
  and test example ``i`` is modelled as a crossed random-effects design, ``d = mu + a_i + b_s + e_si``
  (examples and seeds both random samples, the same examples for every seed). From the two-way ANOVA mean
  squares ``MS_seed``, ``MS_item``, ``MS_res``, ``Var(mean d) = s2_item / n + s2_seed / S + s2_res / (n S)``
  with ``s2_seed = (MS_seed - MS_res) / n``, ``s2_item = (MS_item - MS_res) / S``, ``s2_res = MS_res`` (a
  negative component set to 0), and the t quantile's degrees of freedom by Satterthwaite's approximation
  (Satterthwaite 1946; the design of Clark 1973's "language-as-fixed-effect" correction). The seed-only
  interval treats the test set as the whole population; this one also counts that the test problems are a
  sample, so it is wider when the test set is small.
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
CROSSED = "seeds x examples"


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int
    sd: float = math.nan
    """Standard deviation of the values (nan with fewer than two)."""
    se: float = math.nan
    """Standard error of ``mean`` (``sd / sqrt(n)`` for a t-interval; the crossed model's for ``crossed``)."""
    df: float = math.nan
    """Degrees of freedom of the interval's t quantile (``n - 1``; Satterthwaite's for ``crossed``)."""
    basis: str = "seeds"
    """What the interval accounts for: ``"seeds"`` or ``"seeds x examples"``."""

    @property
    def standard_error(self) -> tuple[float, float]:
        """``(se, df)``, from ``sd`` and ``n`` when the interval was built without them."""
        if math.isfinite(self.se) and math.isfinite(self.df):
            return self.se, self.df
        return self.sd / math.sqrt(self.n) if self.n else math.nan, self.n - 1.0

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
    se = sd / math.sqrt(n)
    half = _stats.t.ppf(0.5 + level / 2, n - 1) * se
    return Interval(m, m - half, m + half, n, sd, se, n - 1.0)


def paired(arm: dict[int, float], reference: dict[int, float], level: float = LEVEL) -> Interval:
    """Interval of ``arm[seed] - reference[seed]`` over the seeds both have."""
    seeds = sorted(set(arm) & set(reference))
    return mean_ci([arm[s] - reference[s] for s in seeds], level)


def crossed(arm: dict[int, list[float]], reference: dict[int, list[float]], level: float = LEVEL) -> Interval:
    """Interval of the mean paired difference when both seeds and test examples are samples (module
    docstring): ``d[s, i] = arm[s][i] - reference[s][i]`` over the seeds both have, each with the same
    examples in the same order. ``n`` in the result counts seeds. Needs two seeds; with fewer, no interval."""
    import numpy as np

    seeds = sorted(set(arm) & set(reference))
    lengths = {len(arm[s]) for s in seeds} | {len(reference[s]) for s in seeds}
    if len(lengths) > 1:
        raise ValueError(f"per-example outcomes of different lengths {sorted(lengths)}: the arms were not tested "
                         "on the same examples")
    d = np.array([[a - b for a, b in zip(arm[s], reference[s])] for s in seeds], dtype=float)
    S, n = d.shape if d.size else (len(seeds), 0)
    if S < 2 or n < 2:
        return Interval(float(d.mean()) if d.size else math.nan, math.nan, math.nan, S, basis=CROSSED)
    grand, by_seed, by_item = d.mean(), d.mean(1), d.mean(0)
    ms_seed = n * ((by_seed - grand) ** 2).sum() / (S - 1)
    ms_item = S * ((by_item - grand) ** 2).sum() / (n - 1)
    ms_res = ((d - by_seed[:, None] - by_item[None, :] + grand) ** 2).sum() / ((S - 1) * (n - 1))
    # Var(mean) = s2_seed / S + s2_item / n + s2_res / (S n), each component from its mean square, a negative
    # estimate set to 0; as a combination sum_k c_k MS_k for Satterthwaite's degrees of freedom.
    c_seed, c_item = float(ms_seed > ms_res), float(ms_item > ms_res)
    c_res = 1.0 - c_seed - c_item
    terms = [(c_seed * ms_seed, S - 1), (c_item * ms_item, n - 1), (c_res * ms_res, (S - 1) * (n - 1))]
    var = sum(t for t, _ in terms) / (S * n)
    if var <= 0:
        return Interval(float(grand), float(grand), float(grand), S, 0.0, 0.0, math.inf, CROSSED)
    df = (sum(t for t, _ in terms)) ** 2 / sum(t * t / k for t, k in terms if t)
    se = math.sqrt(var)
    half = _stats.t.ppf(0.5 + level / 2, df) * se
    return Interval(float(grand), float(grand - half), float(grand + half), S, float(by_seed.std(ddof=1)), se, df,
                    CROSSED)


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
    ``delta`` and the differences' standard deviation ``sd``, over ``n`` seeds: :func:`power_se` with
    ``se = sd / sqrt(n)``, ``df = n - 1``."""
    return power_se(delta, sd / math.sqrt(n), n - 1, level)


def power_se(delta: float, se: float, df: float, level: float = LEVEL) -> float:
    """Probability that a two-sided t-test at ``1 - level`` with standard error ``se`` and ``df`` degrees of
    freedom rejects when the true difference is ``delta``: the noncentral t's two tails beyond ``t_crit``
    (noncentrality ``nc = delta / se``); where scipy's ``nct`` returns nan (far tails) the same probability
    as one integral, ``E_V[Phi(nc - c) + Phi(-nc - c)]``, ``c = t_crit sqrt(V / df)``, ``V ~ chi2(df)``."""
    tc = _stats.t.ppf(0.5 + level / 2, df)
    nc = abs(delta) / se
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
    se, df = diff.standard_error
    if diff.n < 2 or not math.isfinite(se) or not df > 0:
        return math.nan
    if se == 0:
        return 0.0
    hi = se
    while power_se(hi, se, df, level) < target:
        hi *= 2
    return float(_optimize.brentq(lambda d: power_se(d, se, df, level) - target, 0.0, hi, xtol=1e-12 * hi))


def equivalence(diff: Interval, margin: float, higher_is_better: bool) -> str:
    """``equivalent`` / ``better`` / ``worse`` / ``undecided`` for a margin (module docstring); ``n/a`` without
    an interval."""
    if diff.ci is None:
        return "n/a"
    if -margin < diff.lo and diff.hi < margin:
        return "equivalent"
    v = verdict(diff, higher_is_better)
    return "undecided" if v == "no difference" else v
