"""Which runs a sweep needs next, given the runs it already has: learning-rate search and transfer.

The plan is a pure function of the config and the finished runs, so a sweep resumes anywhere and
``--summary-only`` replays the same decisions.

Search (``lrs = "search"``), per arm and rank, on the validation split:

1. run the grid ``start * factor^k`` for ``k = -(points-1)/2 .. (points-1)/2`` with the search seeds;
   a rate's score is the mean validation metric over those seeds (a diverged run scores worst);
2. while the best rate is at an edge of what was run and fewer than ``max_points`` rates were tried,
   run one more grid step beyond that edge; ties go to the lower rate;
3. while even the best rate ends *worse than the model it started from* (its runs' step-0 validation score:
   training at every rate tried damaged the model, so the rates are too high) and fewer than ``max_points``
   rates were tried, run one more grid step below the lowest; then rule 2 again;
4. the chosen rate is *interior* when both its grid neighbours were run (else the summary says so);
5. run the sweep's seeds at the chosen rate (a search run with one of those seeds is reused); under adaptive
   seeds (``seeds = { adaptive = true, ... }``), an arm whose comparison with the reference is still undecided
   gets one more seed at a time, the reference with it (``_adapt``).

Transfer (``lrs = "transfer"``): the reference arm is searched as above; every other arm starts
from a 3-point grid centred on the grid rate nearest to its predicted rate
(``lowrank.theory.transfer_lr``), then follows rules 2-5.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from .config import Arm, Config
from .records import RunRecord, RunSpec


@dataclass
class ArmPlan:
    """The state of one arm and rank."""

    arm: str
    rank: int | None
    mode: str
    """``"list"``, ``"search"`` or ``"transfer"``."""
    scores: dict[float, float] = field(default_factory=dict)
    """Finished rate -> mean validation metric over the seeds that scored it (raw value, not signed)."""
    chosen: float | None = None
    interior: bool | None = None
    pending_search: list[RunSpec] = field(default_factory=list)
    pending_final: list[RunSpec] = field(default_factory=list)
    waiting: str | None = None
    """Why the arm cannot be planned yet (transfer: the reference's search is not finished)."""
    predicted: float | None = None
    """Transfer: the predicted rate before rounding to the grid."""
    search_runs: int = 0
    """Runs the rate selection used (search phase, or every run of a list)."""
    seeds: list[int] | None = None
    """The seeds of its final runs at the chosen rate (default the sweep's; more under adaptive seeds)."""

    @property
    def selected(self) -> bool:
        return self.chosen is not None


def score(records: list[RunRecord], select: str, higher_is_better: bool) -> float:
    """Mean of the validation metric ``select`` over ``records``; the worst value if any diverged."""
    metric = select.removeprefix("val_")
    vals = [r["val"].get(metric) if r.get("status") == "ok" and r.get("val") else None for r in records]
    if any(v is None or not math.isfinite(v) for v in vals):
        return -math.inf if higher_is_better else math.inf
    return statistics.mean(vals)


def start_score(records: list[RunRecord], select: str) -> float | None:
    """Mean of the validation metric ``select`` at step 0 (before any update) over ``records``; ``None`` when a
    record has no step-0 evaluation of it."""
    metric = select.removeprefix("val_")
    vals = [r["eval"][0].get(metric) if r.get("eval") and r["eval"][0].get("step") == 0 else None for r in records]
    if not vals or any(v is None or not math.isfinite(v) for v in vals):
        return None
    return statistics.mean(vals)


def _better(higher_is_better: bool):
    """Sort key: lower is better."""
    return (lambda v: -v) if higher_is_better else (lambda v: v)


def grid_search(cfg: Config, arm: Arm, rank: int | None, center: int, points: int,
                done: dict[str, RunRecord]) -> ArmPlan:
    """Rules 1-4 of the module docstring from grid index ``center``; ``pending_search`` is what to run next."""
    higher = cfg.higher_is_better(cfg.select)
    s, key = cfg.search, _better(higher)
    idx = set(range(center - points // 2, center + points // 2 + 1))
    plan = ArmPlan(arm.name, rank, "search")
    while True:
        runs = {k: [cfg.spec(arm, rank, s.rate(k), seed, "search") for seed in s.seeds] for k in sorted(idx)}
        plan.search_runs = sum(len(v) for v in runs.values())
        plan.pending_search = [r for k in sorted(idx) for r in runs[k] if r["key"] not in done]
        plan.scores = {s.rate(k): score([done[r["key"]] for r in runs[k]], cfg.select, higher) for k in sorted(idx)
                       if all(r["key"] in done for r in runs[k])}
        if plan.pending_search:
            return plan
        best = min(sorted(idx), key=lambda k: key(plan.scores[s.rate(k)]))  # first minimum: the lower rate
        lo, hi = min(idx), max(idx)
        if len(idx) < s.max_points and best in (lo, hi):
            idx.add(lo - 1 if best == lo else hi + 1)
            continue
        start = start_score([done[r["key"]] for r in runs[best]], cfg.select)
        if len(idx) < s.max_points and start is not None and key(plan.scores[s.rate(best)]) > key(start):
            idx.add(lo - 1)  # rule 3: every rate tried ends below where it started
            continue
        plan.chosen, plan.interior = s.rate(best), (best - 1 in idx and best + 1 in idx)
        return plan


def _list_plan(cfg: Config, arm: Arm, rank: int | None, done: dict[str, RunRecord]) -> ArmPlan:
    lrs = sorted(cfg.listed_lrs(arm))
    runs = {lr: [cfg.spec(arm, rank, lr, seed, "final") for seed in cfg.sweep.seeds] for lr in lrs}
    plan = ArmPlan(arm.name, rank, "list", search_runs=sum(len(v) for v in runs.values()))
    plan.pending_final = [r for lr in lrs for r in runs[lr] if r["key"] not in done]
    higher = cfg.higher_is_better(cfg.select)
    plan.scores = {lr: score([done[r["key"]] for r in rs], cfg.select, higher) for lr, rs in runs.items()
                   if all(r["key"] in done for r in rs)}
    if plan.scores:
        key = _better(higher)
        plan.chosen = min(sorted(plan.scores), key=lambda lr: key(plan.scores[lr]))
        plan.interior = lrs.index(plan.chosen) not in (0, len(lrs) - 1) and not plan.pending_final
    return plan


def plan_sweep(cfg: Config, done: dict[str, RunRecord],
               store: dict[str, dict[str, Any]] | None = None) -> list[ArmPlan]:
    """Every arm and rank of ``cfg`` given the finished runs ``done`` (key -> record) and, under
    transfer, the predicted rates in ``store`` (``lowrank_ablation.transfer``)."""
    from .transfer import entry_key

    refs: dict[int | None, ArmPlan] = {}
    out = []
    arms = sorted(cfg.arms, key=lambda a: a.name != cfg.sweep.reference)  # the reference first: others need it
    for arm in arms:
        for rank in cfg.ranks_of(arm):
            mode = cfg.mode(arm)
            if mode == "list":
                p = _list_plan(cfg, arm, rank, done)
            elif mode == "transfer":
                ref = refs.get(rank) or next(iter(refs.values()))
                entry = (store or {}).get(entry_key(cfg, arm, rank, ref.chosen)) if ref.selected else None
                if entry is None:
                    out.append(ArmPlan(arm.name, rank, "transfer",
                                       waiting=f"waits for the transferred rate from {cfg.sweep.reference!r}"))
                    continue
                p = grid_search(cfg, arm, rank, cfg.search.index(entry["predicted_lr"]), 3, done)
                p.mode, p.predicted = "transfer", entry["predicted_lr"]
            else:
                p = full_search(cfg, arm, rank, done)
            if p.mode != "list" and p.selected:
                p.pending_final = [r for seed in cfg.sweep.seeds
                                   for r in [cfg.spec(arm, rank, p.chosen, seed, "final")] if r["key"] not in done]
            if arm.name == cfg.sweep.reference:
                refs[rank] = p
            out.append(p)
    if cfg.adaptive is not None:
        _adapt(cfg, out, done)
    order = {a.name: i for i, a in enumerate(cfg.arms)}
    return sorted(out, key=lambda p: order[p.arm])  # stable: ranks stay in order within an arm


def _adapt(cfg: Config, plans: list[ArmPlan], done: dict[str, RunRecord]) -> None:
    """Adaptive seeds (``config.AdaptiveSeeds``): each undecided arm's seed count, one more at a time, each
    decided on the finished runs only (so the plan stays a pure function of them); the reference runs as many
    seeds as the arm that needs most; the extra seeds' runs join ``pending_final``."""
    from .compare import difference, halfwidth, reference_plan, undecided

    a = cfg.adaptive
    higher = cfg.higher_is_better(cfg.headline)
    arms = {arm.name: arm for arm in cfg.arms}

    def records(p: ArmPlan, seeds: list[int]) -> list[RunRecord] | None:
        got = [done.get(cfg.spec(arms[p.arm], p.rank, p.chosen, s, "final")["key"]) for s in seeds]
        return None if any(r is None for r in got) else [r for r in got if r["status"] == "ok"]

    need: dict[int, int] = {}
    for p in plans:
        ref = reference_plan(cfg, plans, p.rank)
        if p.arm == cfg.sweep.reference or not p.selected or ref is None or not ref.selected:
            continue
        if p.mode == "list" and p.pending_final:  # a list's rate is chosen once all its initial runs are in
            continue
        n = len(a.initial)
        while n < a.max:
            mine, theirs = records(p, a.seeds(n)), records(ref, a.seeds(n))
            if mine is None or theirs is None:
                break
            diff = difference(mine, theirs, cfg.headline)
            if diff.n < 2:  # fewer than two paired seeds finished (runs diverged): more seeds would not decide it
                break
            if not undecided(diff, higher, cfg.sweep.equivalence_margin) or halfwidth(diff) <= a.target_halfwidth:
                break
            n += 1
        p.seeds = a.seeds(n)
        need[id(ref)] = max(need.get(id(ref), len(a.initial)), n)
    for p in plans:
        if id(p) in need:
            p.seeds = a.seeds(need[id(p)])
        if p.seeds and p.selected:
            have = {r["key"] for r in p.pending_final}
            p.pending_final += [r for s in p.seeds[len(a.initial):]
                                for r in [cfg.spec(arms[p.arm], p.rank, p.chosen, s, "final")]
                                if r["key"] not in done and r["key"] not in have]


def final_records(cfg: Config, p: ArmPlan, done: dict[str, RunRecord]) -> list[RunRecord]:
    """The finished runs at ``p``'s chosen rate with the sweep's seeds (what the tables report)."""
    if not p.selected:
        return []
    arm = next(a for a in cfg.arms if a.name == p.arm)
    return [done[r["key"]] for seed in (p.seeds or cfg.sweep.seeds)
            for r in [cfg.spec(arm, p.rank, p.chosen, seed, "final")] if r["key"] in done]


def full_search(cfg: Config, arm: Arm, rank: int | None, done: dict[str, RunRecord]) -> ArmPlan:
    """What a full search (``lrs = "search"``) of this arm would have run and chosen, from ``done`` (the first
    grid centred on the arm's ``search_start`` when it has one)."""
    center = 0 if arm.search_start is None else cfg.search.index(arm.search_start)
    return grid_search(cfg, arm, rank, center, cfg.search.points, done)
