"""Which learning-rate transfer rule predicts tuned rates? Sharpness and first-step quantities of every
arm of a searched sweep at initialization, against the rates its search chose.

    python -m experiments.transfer_report lowrank_ablation/presets/fair-ablation.toml

For every arm (first search seed, the task's init batches) this measures, with
``lowrank.theory.transfer.measure``: the sharpness at initialization (plain and Adam-preconditioned,
with sign; Lanczos on the first ``--sharpness-batches`` batches), and the quantity ``q`` of every
rule of ``lowrank.theory.transfer``. Each rule predicts ``lr = lr_ref * q_ref / q`` from the
reference arm's searched rate; the table gives each prediction's ratio to the arm's tuned rate and
each rule's worst and median error (in factors). Measurements are cached in
``<results dir>/<sweep>_rules_measure.json`` (``--remeasure`` redoes them); the table goes to
``<results dir>/<sweep>_rules.md`` with a plot ``..._rules.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from lowrank_ablation import config as config_mod
from lowrank_ablation.run import read_records
from lowrank_ablation.search import plan_sweep
from lowrank_ablation.tasks import make_task
from lowrank_ablation.transfer import _theory_arm
from lowrank.theory.transfer import DEFAULT_RULE, RULES, _setup, measure, rule_quantity


def measure_all(cfg, iters: int, sharpness_batches: int, cache: Path, remeasure: bool) -> dict[str, dict]:
    data = {} if remeasure or not cache.exists() else json.loads(cache.read_text())
    task = None
    seed = cfg.search.seeds[0]
    for arm in cfg.arms:
        for rank in cfg.ranks_of(arm):
            key = f"{arm.name}|{rank}"
            if key in data:
                continue
            task = task or make_task(cfg.sweep.task, cfg.task)
            built = task.build(seed, cfg.sweep.batch_size)
            tarm = _theory_arm(arm, rank, cfg, built)
            t0 = time.perf_counter()
            _setup(built.model, tarm, built.init_batches, lambda m, b: m(**b).loss)
            q = measure(built.model, tarm, built.init_batches, rules=RULES, sharpness_iters=iters,
                        sharpness_batches=sharpness_batches, seed=0)
            data[key] = {"arm": arm.name, "rank": rank, **q, "seconds": time.perf_counter() - t0}
            print(f"{arm.name} (r={rank}): " + ", ".join(f"{k} {v:.4g}" for k, v in q.items()), file=sys.stderr)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(data, indent=1))
    return data


def _fmt_ratio(x: float) -> str:
    return "n/a" if not math.isfinite(x) else (f"**{x:.2f}**" if 0.5 <= x <= 2 else f"{x:.2f}")


def report(cfg, plans, data) -> tuple[str, dict]:
    ref = next(p for p in plans if p.arm == cfg.sweep.reference)
    q_ref = {r: rule_quantity(r, data[f"{ref.arm}|{ref.rank}"]) for r in RULES}
    rows, errors = [], {r: [] for r in RULES}
    for p in plans:
        m = data.get(f"{p.arm}|{p.rank}")
        if m is None or not p.selected:
            continue
        preds = {}
        for r in RULES:
            q = rule_quantity(r, m)  # a rule whose quantity is not positive for the arm or the reference predicts nothing
            ok = q > 0 and q_ref[r] > 0 and math.isfinite(q) and math.isfinite(q_ref[r])
            preds[r] = ref.chosen * q_ref[r] / q if ok else math.nan
            if p.arm != ref.arm:
                errors[r].append(abs(math.log2(preds[r] / p.chosen)) if math.isfinite(preds[r]) else math.inf)
        rows.append((p, m, preds))
    lines = [f"Learning-rate transfer from {ref.arm} (searched rate {ref.chosen:.3g}) on `{cfg.sweep.name}`: each "
             "rule predicts lr = lr_ref * q_ref / q from quantities measured at initialization (no training); "
             "cells give predicted / tuned (bold: within a factor of 2). The tuned rate is the search's choice on a "
             f"grid of factor {cfg.search.factor:g}, so it is itself known only to within that factor.", "",
             "| arm | tuned lr | interior | sharpness | Adam-preconditioned sharpness | "
             + " | ".join(f"`{r}`" for r in RULES) + " |", "|---|---|---|---|---|" + "---|" * len(RULES)]
    for p, m, preds in rows:
        lines.append(f"| {p.arm} | {p.chosen:.3g} | {'yes' if p.interior else 'no'} | {m['sharpness']:.4g} | "
                     f"{m['sharpness_adam']:.4g} | "
                     + " | ".join(_fmt_ratio(preds[r] / p.chosen) for r in RULES) + " |")
    summary = {}
    for r in RULES:
        e = errors[r]
        fin = [x for x in e if math.isfinite(x)]
        summary[r] = {"worst_factor": 2 ** max(e) if e and all(math.isfinite(x) for x in e) else math.inf,
                      "median_factor": 2 ** statistics.median(fin) if fin else math.inf,
                      "within_2x": sum(x <= 1 for x in e), "arms": len(e)}
    lines += ["", "| rule | worst error (factor) | median error (factor) | arms within 2x |", "|---|---|---|---|"]
    for r in RULES:
        s = summary[r]
        lines.append(f"| `{r}`{' (default)' if r == DEFAULT_RULE else ''} | {s['worst_factor']:.2f} | "
                     f"{s['median_factor']:.2f} | {s['within_2x']}/{s['arms']} |")
    return "\n".join(lines), {"rows": [{"arm": p.arm, "rank": p.rank, "tuned_lr": p.chosen, "interior": p.interior,
                                        **m, "predicted": preds} for p, m, preds in rows], "rules": summary}


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5))
    tuned = [r["tuned_lr"] for r in rows]
    lo, hi = min(tuned) / 10, max(tuned) * 10
    ax.plot([lo, hi], [lo, hi], color="k", lw=1)
    ax.fill_between([lo, hi], [lo / 2, hi / 2], [lo * 2, hi * 2], color="k", alpha=0.08, label="within 2x")
    for rule in RULES:
        pts = [(r["tuned_lr"], r["predicted"][rule]) for r in rows if math.isfinite(r["predicted"][rule])]
        if pts:
            ax.scatter(*zip(*pts), label=rule, s=22)
    ax.set(xscale="log", yscale="log", xlabel="tuned learning rate (search)", ylabel="predicted at initialization",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--iters", type=int, default=30, help="Lanczos steps for the sharpness rules")
    p.add_argument("--sharpness-batches", type=int, default=1)
    p.add_argument("--remeasure", action="store_true")
    args = p.parse_args(argv)
    cfg = config_mod.load(args.config)
    results = Path(cfg.sweep.results)
    stem = results.parent / cfg.sweep.name
    data = measure_all(cfg, args.iters, args.sharpness_batches, Path(f"{stem}_rules_measure.json"),
                       args.remeasure)
    done = {r["key"]: r for r in read_records(results)}
    plans = plan_sweep(cfg, done)
    text, obj = report(cfg, plans, data)
    Path(f"{stem}_rules.md").write_text(f"# {cfg.sweep.name}: {' '.join(['python -m experiments.transfer_report', args.config])}\n\n"
                                           f"{text}\n\n![predicted vs tuned]({stem.name}_rules.png)\n")
    Path(f"{stem}_rules.json").write_text(json.dumps(obj, indent=1))
    plot(obj["rows"], Path(f"{stem}_rules.png"), cfg.sweep.name)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
