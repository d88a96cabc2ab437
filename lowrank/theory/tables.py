"""Tables of first-step alignment results (``lowrank.theory.compare``): a summary per initializer and a
per-layer table with the Eckart-Young floor. ``experiments/theory_report.py`` runs them on a real model."""

from __future__ import annotations

import statistics

import torch

from .alignment import Alignment


def summarize(results: dict[str, dict[str, Alignment]]) -> str:
    lines = ["| init | rel. error (median) | floor (median) | excess over floor (median / max) | cosine (median) | "
             "layers at the floor (excess < 1e-3) |", "|---|---|---|---|---|---|"]
    for label, per_layer in results.items():
        al = list(per_layer.values())
        ex = [a.excess for a in al]
        lines.append(f"| {label} | {statistics.median(a.rel_error for a in al):.4f} | "
                     f"{statistics.median(a.floor for a in al):.4f} | {statistics.median(ex):.2e} / {max(ex):.2e} | "
                     f"{statistics.median(a.cosine for a in al):.4f} | {sum(e < 1e-3 for e in ex)}/{len(ex)} |")
    return "\n".join(lines)


def per_layer(results, G, rank: int) -> str:
    """Per layer: the rank-``2 rank`` floor and each arm's error; an arm whose initializer allocated this
    layer another rank (EVA, GoRA) shows it, ``(r=k)``: its floor is that of ``2k``."""
    labels = list(results)
    layers = list(next(iter(results.values())))
    head = f"| layer | floor (rank {2 * rank}) | " + " | ".join(f"{lab} error" for lab in labels) + " |"
    lines = [head, "|---|---|" + "---|" * len(labels)]
    for name in layers:
        S2 = torch.linalg.svdvals(G[name].double()).square()
        floor = (S2[2 * rank:].sum() / S2.sum()).sqrt().item() if S2.sum() > 0 else 0.0
        cells = " | ".join(f"{results[lab][name].rel_error:.4f}"
                           + (f" (r={results[lab][name].rank})" if results[lab][name].rank != rank else "")
                           for lab in labels)
        lines.append(f"| {name} | {floor:.4f} | {cells} |")
    return "\n".join(lines)
