"""The sweep's figures: training and validation curves at each arm's chosen rate, and the rate search.

Each arm keeps one colour, line style and marker across both figures (18 colours x 4 styles x 8 markers,
so 16+ arms stay apart in colour and in print); curves are means over seeds with a band for the 95%
t-interval across seeds at each step; legends sit outside the axes; axis labels carry the task's units;
the title names the task, its model and data, and the rank.
"""

from __future__ import annotations

import math
from pathlib import Path

from .config import Config
from .curves import WINDOW, smooth
from .search import ArmPlan, final_records
from .verdicts import mean_ci

STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def arm_styles(names: list[str]) -> dict[str, dict]:
    """A distinct ``(color, linestyle, marker)`` per arm, in config order."""
    plt = _pyplot()
    colors = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
    return {n: {"color": colors[i % len(colors)], "linestyle": STYLES[i % len(STYLES)],
                "marker": MARKERS[i % len(MARKERS)]} for i, n in enumerate(names)}


def _label(cfg: Config, metric: str) -> str:
    unit = cfg.task_class.units.get(metric)
    return metric.replace("_", " ") + (f" ({unit})" if unit else "")


def _band(values_per_seed: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and 95% t-interval across seeds at each index (no band with one seed)."""
    mean, lo, hi = [], [], []
    for col in zip(*values_per_seed):
        iv = mean_ci([v for v in col if v is not None and math.isfinite(v)])
        mean.append(iv.mean)
        lo.append(iv.lo if iv.ci else iv.mean)
        hi.append(iv.hi if iv.ci else iv.mean)
    return mean, lo, hi


def _arm_label(cfg: Config, p: ArmPlan) -> str:
    rank = "" if p.rank is None or len(cfg.sweep.ranks) == 1 else f" r={p.rank}"
    return f"{p.arm}{rank} (lr {p.chosen:.3g})"


def _finish(plt, fig, axes, path: Path, title: str) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_curves(cfg: Config, plans: list[ArmPlan], done, path: Path) -> None:
    """Smoothed training loss and the validation headline metric vs step at each arm's chosen rate."""

    plt = _pyplot()
    metric = cfg.headline
    style = arm_styles([a.name for a in cfg.arms])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in plans:
        rs = [r for r in final_records(cfg, p, done) if r["status"] == "ok"]
        if not rs:
            continue
        st, label = style[p.arm], _arm_label(cfg, p)
        n = min(len(r["loss_curve"]) for r in rs)
        mean, lo, hi = _band([smooth(r["loss_curve"])[:n] for r in rs])
        x = range(1, n + 1)
        axes[0].plot(x, mean, label=label, markevery=max(1, n // 8), markersize=4, linewidth=1.3, **st)
        axes[0].fill_between(x, lo, hi, color=st["color"], alpha=0.07, linewidth=0)
        steps = [e["step"] for e in rs[0]["eval"]]
        mean, lo, hi = _band([[e[metric] for e in r["eval"][:len(steps)]] for r in rs])
        axes[1].plot(steps, mean, label=label, markersize=5, linewidth=1.3, **st)
        axes[1].fill_between(steps, lo, hi, color=st["color"], alpha=0.07, linewidth=0)
    batch = f"training step (batches of {cfg.sweep.batch_size} {cfg.task_class.example})"
    axes[0].set(xlabel=batch, ylabel=f"training {_label(cfg, 'loss')}\nmoving average of {WINDOW} steps")
    axes[1].set(xlabel=batch, ylabel=f"validation {_label(cfg, metric)}")
    for ax in axes:
        ax.grid(alpha=0.3)
    seeds = len(cfg.sweep.seeds)
    more = f" (up to {cfg.adaptive.max}: adaptive)" if cfg.adaptive is not None else ""
    _finish(plt, fig, axes, path, f"{cfg.title()}\nmean over {seeds} seed{'s' * (seeds > 1)}{more}"
            + (", band: 95% t-interval across seeds" if seeds > 1 else ""))


def plot_lr(cfg: Config, plans: list[ArmPlan], path: Path) -> None:
    """The validation metric that chooses rates vs learning rate, one line per arm; the chosen rate starred."""
    plt = _pyplot()
    style = arm_styles([a.name for a in cfg.arms])
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for p in plans:
        pts = sorted((lr, v) for lr, v in p.scores.items() if math.isfinite(v))
        if not pts:
            continue
        ax.plot(*zip(*pts), label=_arm_label(cfg, p) if p.chosen else p.arm, **style[p.arm])
        if p.chosen in p.scores and math.isfinite(p.scores[p.chosen]):
            ax.plot([p.chosen], [p.scores[p.chosen]], marker="*", markersize=14, color=style[p.arm]["color"],
                    markeredgecolor="black", linestyle="none")
    ax.set_xscale("log")
    metric = cfg.select.removeprefix("val_")
    searched = isinstance(cfg.sweep.lrs, str)
    seeds = len(cfg.search.seeds if searched else cfg.sweep.seeds)
    ax.set(xlabel="learning rate (adapters; full FT: all weights)",
           ylabel=f"validation {_label(cfg, metric)}\nmean over {seeds} {'search ' if searched else ''}"
                  f"seed{'s' * (seeds > 1)}")
    ax.grid(alpha=0.3)
    _finish(plt, fig, [ax], path, f"{cfg.title()}\nrate search ({'higher' if cfg.higher_is_better(metric) else 'lower'}"
            " is better; star: chosen rate)")
