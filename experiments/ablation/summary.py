"""Tables (markdown, mean +/- std over seeds) and plots (matplotlib PNG) of a results file."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

WINDOW = 10


def smooth(xs: list[float], w: int = WINDOW) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _ms(values: list[float], fmt: str = ".3f") -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def steps_to(curve: list[float], target: float) -> int | None:
    """First step (1-based) at which the smoothed training loss is <= ``target``."""
    for i, v in enumerate(smooth(curve)):
        if v <= target:
            return i + 1
    return None


def _metric(records) -> str:
    return "acc" if "acc" in records[0]["final_eval"] else "loss"


def group(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        groups[(r["arm"]["name"], r["rank"], r["lr"])].append(r)
    return groups


def table(records: list[dict[str, Any]], reference: str, ref_lr: dict[Any, float] | None = None) -> str:
    """Per (arm, rank, lr): final eval metrics, train loss, convergence speed-up vs ``reference``
    (at the same lr, or at ``ref_lr[rank]`` when given: e.g. the reference's own best rate)."""
    groups = group(records)
    metric = _metric(records)
    ok = lambda rs: [r for r in rs if r["status"] == "ok"]  # noqa: E731
    extra = metric != "loss"  # classification: accuracy and loss; regression: loss once
    lines = [f"| arm | rank | lr | final eval {metric} |" + (" final eval loss |" if extra else "") +
             f" train loss (last {WINDOW}) | steps to {reference}'s final train loss | speed-up vs {reference} | "
             "diverged | time (s) |", "|---|---|---|---|" + ("---|" if extra else "") + "---|---|---|---|---|"]
    order = {a: i for i, a in enumerate(dict.fromkeys(r["arm"]["name"] for r in records))}  # the config's arm order
    for (arm, rank, lr), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] or 0, kv[0][2])):
        # Full FT (rank None), or a rank the reference was not run at: compare with its first rank.
        ref_rank = rank if any(k[:2] == (reference, rank) for k in groups) else _first_rank(groups, reference)
        at = ref_lr.get(ref_rank, lr) if ref_lr else lr
        ref = ok(groups.get((reference, ref_rank, at), []))
        target = statistics.mean(smooth(r["loss_curve"])[-1] for r in ref) if ref else None
        # A reference seed that ends above the seeds' mean final loss counts its full length.
        ref_steps = [steps_to(r["loss_curve"], target) or len(r["loss_curve"]) for r in ref] if ref else []
        if arm == reference:
            steps = ref_steps
        else:
            steps = [steps_to(r["loss_curve"], target) for r in ok(rs)] if target is not None else []
        reached = [s for s in steps if s is not None]
        speed = (statistics.mean(ref_steps) / statistics.mean(reached)) if reached and ref_steps and len(reached) == len(steps) else None
        steps_txt = (_ms([float(s) for s in reached], ".0f") + ("" if len(reached) == len(steps) else
                     f" ({len(steps) - len(reached)} never)")) if steps else "n/a"
        eval_loss = f"{_ms([r['final_eval']['loss'] for r in ok(rs)])} | " if extra else ""
        lines.append(
            f"| {arm} | {rank if rank is not None else 'full'} | {lr:g} | "
            f"{_ms([r['final_eval'][metric] for r in ok(rs)])} | {eval_loss}"
            f"{_ms([statistics.mean(r['loss_curve'][-WINDOW:]) for r in ok(rs)])} | {steps_txt} | "
            f"{f'{speed:.2f}x' if speed else 'n/a'} | {len(rs) - len(ok(rs))}/{len(rs)} | "
            f"{_ms([r['wall_time_s'] for r in rs], '.0f')} |")
    return "\n".join(lines)


def _first_rank(groups, arm):
    ranks = sorted({k[1] for k in groups if k[0] == arm and k[1] is not None})
    return ranks[0] if ranks else None


def best_lr(records: list[dict[str, Any]]) -> dict[tuple, float]:
    """Each (arm, rank)'s best learning rate by mean final eval metric (accuracy up, loss down)."""
    metric = _metric(records)
    sign = -1 if metric == "acc" else 1
    best: dict[tuple, tuple[float, float]] = {}
    for (arm, rank, lr), rs in group(records).items():
        vals = [r["final_eval"][metric] for r in rs if r["status"] == "ok"]
        if not vals:
            continue
        score = sign * statistics.mean(vals)
        if (arm, rank) not in best or score < best[(arm, rank)][0]:
            best[(arm, rank)] = (score, lr)
    return {k: v[1] for k, v in best.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(records: list[dict[str, Any]], path: Path, title: str, pick: dict[tuple, float] | None = None) -> None:
    """Smoothed train loss and eval metric vs step, mean over seeds, one line per arm (at ``pick``'s lr)."""
    plt = _pyplot()
    metric = _metric(records)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    order = {a: i for i, a in enumerate(dict.fromkeys(r["arm"]["name"] for r in records))}
    for (arm, rank, lr), rs in sorted(group(records).items(), key=lambda kv: order[kv[0][0]]):
        if pick is not None and pick.get((arm, rank)) != lr:
            continue
        rs = [r for r in rs if r["status"] == "ok"]
        if not rs:
            continue
        n = min(len(r["loss_curve"]) for r in rs)
        mean = [statistics.mean(smooth(r["loss_curve"])[i] for r in rs) for i in range(n)]
        label = f"{arm} (lr {lr:g})"
        ax1.plot(range(1, n + 1), mean, label=label)
        steps = [e["step"] for e in rs[0]["eval"]]
        ax2.plot(steps, [statistics.mean(r["eval"][i][metric] for r in rs) for i in range(len(steps))], marker="o",
                 label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"train loss (moving average {WINDOW})")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"eval {metric}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(plt, fig, path)


def plot_lr(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Final eval metric vs learning rate, one line per arm (mean over seeds)."""
    plt = _pyplot()
    metric = _metric(records)
    by_arm: dict[str, list] = defaultdict(list)
    for (arm, rank, lr), rs in group(records).items():
        vals = [r["final_eval"][metric] for r in rs if r["status"] == "ok"]
        by_arm[arm].append((lr, statistics.mean(vals) if vals else float("nan")))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm, pts in sorted(by_arm.items()):
        ax.plot(*zip(*sorted(pts)), marker="o", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (adapters; full FT: all weights)")
    ax.set_ylabel(f"final eval {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    _save(plt, fig, path)


def summarize(records: list[dict[str, Any]], results_path: Path, reference: str, title: str) -> str:
    """Write ``<stem>.md`` and PNG plots next to the results file; return the markdown."""
    if not records:
        return "no finished runs yet"
    stem = results_path.with_suffix("")
    parts = [f"# {title}", "", table(records, reference), ""]
    lrs = sorted({r["lr"] for r in records})
    pick = None
    if len(lrs) > 1:
        pick = best_lr(records)
        parts += ["## Each arm at its own best learning rate (speed-up vs the reference at its own best rate)", "",
                  table([r for r in records if pick.get((r["arm"]["name"], r["rank"])) == r["lr"]], reference,
                        ref_lr={k: v for (a, k), v in pick.items() if a == reference}),
                  "", "Best learning rates: " + ", ".join(f"{a} (r={k if k is not None else 'full'}): {v:g}" for (a, k), v in sorted(
                      pick.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))), ""]
        plot_lr(records, Path(f"{stem}_lr.png"), title)
        parts.append(f"![final metric vs lr]({Path(f'{stem}_lr.png').name})")
    plot_curves(records, Path(f"{stem}_curves.png"), title, pick)
    parts.append(f"![curves]({Path(f'{stem}_curves.png').name})")
    text = "\n".join(parts) + "\n"
    Path(f"{stem}.md").write_text(text)
    return text
