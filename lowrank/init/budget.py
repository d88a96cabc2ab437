"""Rank budgets: per-layer ranks chosen by the initializer under a total, before layers are built.

``LoRAConfig(rank_budget=N, rank_min=..., rank_max=...)`` gives an initializer that supports it
(those deriving from ``RankAllocation``: EVA, GoRA) the total rank ``N`` summed over the target layers;
after the statistics pass its :meth:`~lowrank.init.base.RankAllocation.allocate` returns the ranks, the
driver checks them (integers within each layer's bounds, summing to ``N`` exactly) and the layers
are built with them. The two allocation rules the methods use live here:

- :func:`allocate_greedy` (EVA): every layer offers ranked components with scores; each layer gets
  its minimum, and the rest of the budget goes to the best-scoring remaining components overall.
- :func:`allocate_proportional` (GoRA): ranks proportional to a per-layer weight, clipped to the
  bounds (the excess redistributed), then rounded by largest remainder so the sum is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class RankBudget:
    """A total rank over the target layers, with per-layer bounds."""

    total: int
    """The sum of the allocated ranks."""
    lo: Mapping[str, int]
    """Per-layer minimum rank."""
    hi: Mapping[str, int]
    """Per-layer maximum rank (already capped by what the method and the layer's shape allow)."""

    def __post_init__(self):
        lo, hi = sum(self.lo.values()), sum(self.hi.values())
        bad = [n for n in self.lo if self.lo[n] > self.hi[n]]
        if bad:
            raise ValueError(f"layer {bad[0]!r} allows ranks up to {self.hi[bad[0]]} but rank_min is "
                             f"{self.lo[bad[0]]}; lower rank_min or drop the layer from targets")
        if self.total < lo:
            raise ValueError(f"rank_budget={self.total} is smaller than {len(self.lo)} target layers x their minimum "
                             f"rank (= {lo}); raise rank_budget to at least {lo} or lower rank_min")
        if self.total > hi:
            raise ValueError(f"rank_budget={self.total} is larger than the target layers can hold ({hi}, the sum of "
                             f"their maximum ranks); lower rank_budget to at most {hi}, raise rank_max (or the "
                             "method's own cap, e.g. EVA's rho), or add targets")

    def check(self, ranks: Mapping[str, int], who: str) -> dict[str, int]:
        """``ranks`` as a dict, or a ``ValueError`` naming what is wrong with them."""
        missing = [n for n in self.lo if n not in ranks]
        if missing:
            raise ValueError(f"initializer {who!r} allocated no rank to layer {missing[0]!r}")
        for n in self.lo:
            r = ranks[n]
            if not isinstance(r, int) or isinstance(r, bool) or not self.lo[n] <= r <= self.hi[n]:
                raise ValueError(f"initializer {who!r} allocated rank {r!r} to layer {n!r}, outside its bounds "
                                 f"[{self.lo[n]}, {self.hi[n]}]")
        got = sum(ranks[n] for n in self.lo)
        if got != self.total:
            raise ValueError(f"initializer {who!r} allocated ranks summing to {got}, not the budget {self.total}")
        return {n: int(ranks[n]) for n in self.lo}


def allocate_greedy(scores: Mapping[str, torch.Tensor], budget: RankBudget) -> dict[str, int]:
    """Each layer gets ``lo`` components; the rest of the budget goes to the components with the largest
    scores among each layer's next ones (component ``i`` of a layer only after ``i - 1``; scores are
    expected non-increasing within a layer), up to ``hi``. Ties: the earlier layer, then the earlier component."""
    ranks = dict(budget.lo)
    cands = []
    for li, (name, s) in enumerate(scores.items()):
        s = s.detach().double().cpu()
        if not torch.isfinite(s).all():
            raise ValueError(f"rank allocation scores of layer {name!r} are not finite: {s.tolist()[:5]} ...")
        best = float("inf")
        for i in range(budget.lo[name], min(budget.hi[name], s.numel())):
            best = min(best, float(s[i]))  # a running minimum keeps each layer's picks contiguous
            cands.append((-best, li, i, name))
    left = budget.total - sum(ranks.values())
    if left > len(cands):
        raise ValueError(f"the layers offer {len(cands)} components beyond their minimum ranks but the budget needs "
                         f"{left}; lower rank_budget or raise the per-layer maximum")
    for _, _, _, name in sorted(cands)[:left]:
        ranks[name] += 1
    return ranks


def allocate_proportional(weights: Mapping[str, float], budget: RankBudget) -> dict[str, int]:
    """Ranks proportional to ``weights`` (non-negative), clipped to ``[lo, hi]`` with the excess or deficit
    shared over the unclipped layers (water-filling), then rounded down and topped up by largest remainder (ties: the
    earlier layer) so they sum to the budget exactly."""
    names = list(weights)
    w = {n: float(weights[n]) for n in names}
    if any(not math.isfinite(v) or v < 0 for v in w.values()):
        raise ValueError(f"rank allocation weights must be finite and >= 0, got {w}")
    top = max(w.values(), default=0.0)
    w = {n: max(v / top, 1e-12) if top > 0 else 1.0 for n, v in w.items()}  # in (0, 1]: a zero weight still counts
    fill = lambda lam: {n: min(max(lam * w[n], budget.lo[n]), budget.hi[n]) for n in names}  # noqa: E731
    lo_lam, hi_lam = 0.0, max(budget.hi[n] / w[n] for n in names)
    for _ in range(200):  # water-filling: sum_n clip(lam w_n, lo_n, hi_n) = total, monotone in lam
        mid = (lo_lam + hi_lam) / 2
        lo_lam, hi_lam = (mid, hi_lam) if sum(fill(mid).values()) < budget.total else (lo_lam, mid)
    target = fill(hi_lam)
    # Each target lies in [lo, hi] (integers), so the floors do too and fall short by fewer than len(names).
    ranks = {n: min(int(math.floor(target[n] + 1e-9)), budget.hi[n]) for n in names}
    short = budget.total - sum(ranks.values())
    order = sorted((n for n in names if ranks[n] < budget.hi[n]), key=lambda n: (-(target[n] - ranks[n]), names.index(n)))
    for n in order[:max(short, 0)]:
        ranks[n] += 1
    over = sorted((n for n in names if ranks[n] > budget.lo[n]), key=lambda n: (target[n] - ranks[n], names.index(n)))
    for n in over[:max(-short, 0)]:  # only from rounding a target a hair below an integer up
        ranks[n] -= 1
    return ranks
