"""The summary of a sweep: per arm and rank at its chosen learning rate, the test metric with its 95%
interval over seeds, the paired difference to the reference arm with a verdict, steps to the
reference's final training loss; the search and transfer decisions; markdown, JSON and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .config import Config
from .records import RunRecord
from .search import ArmPlan, final_records, full_search
from .compare import difference, reference_plan
from .curves import smooth, steps_to
from .verdicts import CROSSED, Interval, equivalence, mdd, mean_ci, verdict

def _ok(records):
    return [r for r in records if r["status"] == "ok"]


def rows(cfg: Config, plans: list[ArmPlan], done: dict[str, RunRecord]) -> list[dict[str, Any]]:
    """One summary row per arm and rank (the objects ``--json`` prints)."""
    metric = cfg.headline
    higher = cfg.higher_is_better(metric)
    out = []
    for p in plans:
        finals = final_records(cfg, p, done)
        ok = _ok(finals)
        test = {r["seed"]: r["test"][metric] for r in ok}
        ref_plan = reference_plan(cfg, plans, p.rank)
        ref_finals = _ok(final_records(cfg, ref_plan, done)) if ref_plan else []
        # exact match / pass@1 with per-example outcomes: seeds and examples sampled; else seeds only
        diff = difference(ok, ref_finals, metric) if ref_finals else Interval(math.nan, math.nan, math.nan, 0)
        target = statistics.fmean(smooth(r["loss_curve"])[-1] for r in ref_finals) if ref_finals else None
        steps = [steps_to(r["loss_curve"], target) for r in ok] if target is not None else []
        if p.arm == cfg.sweep.reference:  # a reference seed that ends above the mean counts its full length
            steps = [s or len(r["loss_curve"]) for s, r in zip(steps, ok)]
        reached = [s for s in steps if s is not None]
        st = mean_ci(reached) if steps and len(reached) == len(steps) else Interval(math.nan, math.nan, math.nan, 0)
        ref_steps = [steps_to(r["loss_curve"], target) or len(r["loss_curve"]) for r in ref_finals]
        is_ref = p.arm == cfg.sweep.reference and ref_plan is p
        t = mean_ci(list(test.values()))
        out.append({
            "arm": p.arm, "rank": p.rank, "mode": p.mode, "lr": p.chosen, "lr_interior": p.interior,
            "search_runs": p.search_runs, "scores": {f"{k:g}": v for k, v in sorted(p.scores.items())},
            "transfer_predicted_lr": p.predicted, "n_seeds": len(ok), "diverged": len(finals) - len(ok),
            "pending": len(p.pending_search) + len(p.pending_final) + (1 if p.waiting else 0),
            "metric": metric, "test_metric": _num(t.mean), "test_metric_ci": t.ci,
            "test_loss": _num(mean_ci([r["test"]["loss"] for r in ok]).mean),
            f"val_{metric}": _num(mean_ci([r["val"][metric] for r in ok]).mean),
            "delta_vs_reference": _num(diff.mean), "delta_ci": diff.ci, "delta_n": diff.n,
            "delta_basis": None if is_ref else diff.basis,
            "verdict": "reference" if is_ref else verdict(diff, higher),
            "mdd": None if is_ref else _num(mdd(diff)),
            "equivalence": None if is_ref or cfg.sweep.equivalence_margin is None
            else equivalence(diff, cfg.sweep.equivalence_margin, higher),
            "steps_to_reference_loss": _num(st.mean), "steps_ci": st.ci,
            "steps_never": len(steps) - len(reached),
            "speed_up": (statistics.fmean(ref_steps) / st.mean) if ref_steps and st.n else None,
            "time_s": _num(mean_ci([r["wall_time_s"] for r in finals]).mean),
        })
        counted = [r["intruders"]["total"] for r in ok if r.get("intruders")]
        if counted:  # records from before the metric carry none (and their summaries stay as they were)
            iv = mean_ci(counted)
            out[-1].update(intruders=iv.mean, intruders_ci=iv.ci, intruders_n=len(counted))
    return out


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _f(x, spec=".3f", none="n/a") -> str:
    return none if x is None else f"{x:{spec}}"


def _ci(mean, ci, spec=".3f") -> str:
    if mean is None:
        return "n/a"
    return f"{mean:{spec}}" + ("" if ci is None else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def _delta_cell(r: dict[str, Any]) -> str:
    """Δ with its interval; ``†`` marks an interval over seeds and test examples (``verdicts.crossed``)."""
    if r["verdict"] == "reference":
        return "0"
    return _ci(r["delta_vs_reference"], r["delta_ci"], "+.3f") + (" †" if r.get("delta_basis") == CROSSED else "")


def _verdict_cell(r: dict[str, Any]) -> str:
    """The verdict; a "no difference" also says what its interval rules out (no difference larger than the
    interval's farthest end from 0)."""
    if r["verdict"] == "no difference" and r["delta_ci"]:
        return f"no difference larger than {max(abs(r['delta_ci'][0]), abs(r['delta_ci'][1])):.3f}"
    return r["verdict"]


def markdown(cfg: Config, plans: list[ArmPlan], done: dict[str, RunRecord], rs: list[dict[str, Any]]) -> str:
    metric = rs[0]["metric"] if rs else "loss"
    extra = metric != "loss"  # classification: accuracy and loss; regression: loss once
    ref = cfg.sweep.reference
    margin = cfg.sweep.equivalence_margin
    lines = [f"Each arm at its chosen learning rate (chosen on validation `{cfg.select}`); test metrics, mean and "
             f"95% t-interval over seeds; Δ = paired difference to {ref} (same seeds and batches).", "",
             f"| arm | rank | lr | interior | runs to choose lr | seeds | test {metric} |" + (" test loss |" if extra else "")
             + f" Δ test {metric} vs {ref} | verdict | detectable Δ (80% power) |"
             + (f" within ±{margin:g} |" if margin is not None else "")
             + f" steps to {ref}'s final train loss | speed-up | time (s) |"
             + (" intruder dims |" if any("intruders" in r for r in rs) else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if extra else "") + "---|---|---|" + ("---|" if margin is not None else "")
             + "---|---|---|" + ("---|" if any("intruders" in r for r in rs) else "")]
    for r in rs:
        rank = "full" if r["rank"] is None else r["rank"]
        interior = {True: "yes", False: "**no**", None: "n/a"}[r["lr_interior"]]
        if r["mode"] == "list" and len(r["scores"]) <= 1:
            interior = "given"  # one rate from the config: nothing was searched
        steps = _ci(r["steps_to_reference_loss"], r["steps_ci"], ".0f") + (
            f" ({r['steps_never']} never)" if r["steps_never"] else "")
        pending = f" ({r['pending']} pending)" if r["pending"] else ""
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {r['arm']}{pending} | {rank} | {_f(r['lr'], '.3g')} | {interior} | {r['search_runs']} | "
                     f"{r['n_seeds']}{div} | {_ci(r['test_metric'], r['test_metric_ci'])} | "
                     + (f"{_f(r['test_loss'])} | " if extra else "") +
                     f"{_delta_cell(r)} | "
                     f"{_verdict_cell(r)} | {_f(r['mdd'])} | "
                     + (f"{r['equivalence'] or ''} | " if margin is not None else "")
                     + f"{steps} | {_f(r['speed_up'], '.2f') + 'x' if r['speed_up'] else 'n/a'} | "
                     f"{_f(r['time_s'], '.0f')} |"
                     + ((f" {_ci(r.get('intruders'), r.get('intruders_ci'), '.1f')} |")
                        if any("intruders" in x for x in rs) else ""))
    lines += _notes(cfg, rs)
    lines += ["", "Learning rates tried (validation " + cfg.select.removeprefix("val_") + ", mean over search seeds; "
              "chosen rate in bold):", ""]
    for p in plans:
        tried = ", ".join((f"**{lr:.3g}: {v:.3f}**" if lr == p.chosen else f"{lr:.3g}: {v:.3f}")
                          for lr, v in sorted(p.scores.items()))
        extra = f" (predicted {p.predicted:.3g})" if p.predicted is not None else ""
        lines.append(f"- {p.arm} (r={'full' if p.rank is None else p.rank}, {p.mode}{extra}): {tried or 'none yet'}")
    if any(p.mode == "transfer" for p in plans):
        lines += ["", transfer_table(cfg, plans, done)]
    return "\n".join(lines)


def _notes(cfg: Config, rs: list[dict[str, Any]]) -> list[str]:
    """The paragraphs under the table: what its seeds, intervals, verdicts and margins mean."""
    ref, margin, lines = cfg.sweep.reference, cfg.sweep.equivalence_margin, []
    n = min((r["n_seeds"] for r in rs), default=0)
    if n == 1:
        lines += ["", "One seed per arm: no intervals and no verdicts; add seeds for a comparison."]
    elif 1 < n < 5:
        lines += ["", f"With {n} seeds the t-intervals are wide (t_0.975 = {_t(n):.2f}); 'no difference' means the "
                      "interval contains 0, not that the arms are equal."]
    if n > 1:
        lines += ["", "'No difference larger than X': X is the 95% paired interval's end farthest from 0, what the data "
                      "rule out. Detectable Δ: the smallest true difference the paired t-test (5% level) finds with "
                      "probability 0.8 at the observed spread of the per-seed differences and this many seeds."
                  + (f" Within ±{margin:g}: 'equivalent' when the 95% interval lies inside (-{margin:g}, {margin:g}) "
                     "(two one-sided tests), else better / worse / undecided." if margin is not None else "")]
    if cfg.adaptive is not None:
        a = cfg.adaptive
        lines += ["", f"Seeds: adaptive seeds ({len(a.initial)} to start; an arm still undecided against {ref} got one "
                      f"more at a time, {ref} with it, until decided, its interval's half-width was at most "
                      f"{a.target_halfwidth:g}, or it had {a.max}); the seeds column says how many each used."]
    if any(r.get("delta_basis") == CROSSED for r in rs):
        lines += ["", "†: the interval, verdict and detectable Δ count both the seeds and the test examples as samples "
                      "(per-example outcomes paired across arms; a crossed random-effects model with Satterthwaite's "
                      "degrees of freedom, docs/methods.md); the others use the per-seed means only."]
    return lines


def _t(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def transfer_table(cfg: Config, plans: list[ArmPlan], done: dict[str, RunRecord]) -> str:
    """Runs used and the rate chosen under transfer, against a full search replayed on the same results."""
    lines = ["Transfer against a full search (a full search is replayed on the same results file; "
             "'not run' when its runs are missing):", "",
             "| arm | rank | predicted lr | transfer: lr chosen (runs) | full search: lr chosen (runs) | same rate |",
             "|---|---|---|---|---|---|"]
    used = full = 0
    complete = True
    for p in plans:
        arm = next(a for a in cfg.arms if a.name == p.arm)
        fs = full_search(cfg, arm, p.rank, done) if p.mode in ("transfer", "search") else None
        used += p.search_runs
        if fs is None or not fs.selected:
            complete = False
        else:
            full += fs.search_runs
        lines.append(f"| {p.arm} | {'full' if p.rank is None else p.rank} | {_f(p.predicted, '.3g', '(searched)')} | "
                     f"{_f(p.chosen, '.3g')} ({p.search_runs}) | "
                     + (f"{fs.chosen:.3g} ({fs.search_runs}) | {'yes' if fs.chosen == p.chosen else 'no'} |"
                        if fs is not None and fs.selected else "not run | n/a |"))
    lines += ["", f"Search-phase runs: transfer {used}" + (f", full search {full} (ratio {used / full:.2f})"
                                                          if complete and full else ", full search not complete")]
    return "\n".join(lines)


def summarize(cfg: Config, plans: list[ArmPlan], done: dict[str, RunRecord], results_path: Path,
              as_json: bool = False) -> str:
    """Write ``<sweep name>.md`` and PNG plots next to the results file (several configs may share one results
    file); return the markdown, or JSON lines with ``as_json``."""
    rs = rows(cfg, plans, done)
    if as_json:
        return "\n".join(json.dumps(r) for r in rs)
    if not any(r["n_seeds"] for r in rs):
        return "no finished runs at a chosen rate yet"
    from .plots import plot_curves, plot_lr

    stem = results_path.parent / cfg.sweep.name
    title = f"{cfg.sweep.name}: {cfg.command}"
    parts = [f"# {title}", "", markdown(cfg, plans, done, rs), ""]
    if any(len(p.scores) > 1 for p in plans):
        plot_lr(cfg, plans, Path(f"{stem}_lr.png"))
        parts.append(f"![validation metric vs lr]({Path(f'{stem}_lr.png').name})")
    plot_curves(cfg, plans, done, Path(f"{stem}_curves.png"))
    parts.append(f"![curves]({Path(f'{stem}_curves.png').name})")
    text = "\n".join(parts) + "\n"
    Path(f"{stem}.md").write_text(text)
    return text
