"""Training-loss curves as the summary and the plots read them: a trailing moving average, and the first step
at which it reaches a target."""

from __future__ import annotations

WINDOW = 10


def smooth(xs: list[float], w: int = WINDOW) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def steps_to(curve: list[float], target: float) -> int | None:
    """First step (1-based) at which the smoothed training loss is <= ``target``."""
    for i, v in enumerate(smooth(curve)):
        if v <= target:
            return i + 1
    return None
