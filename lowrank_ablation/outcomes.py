"""Per-example outcomes: what a task's ``evaluate`` may return beside its metrics, and how a record keeps them.

``evaluate`` may add ``"outcomes": {metric: [value per example]}`` for a metric that is a mean over examples
(exact match, pass@1), in the order of the examples in the batches it was given (the same order on every
build with the same task options, so two arms' lists pair example by example). The runner checks that each
list's mean is the metric, keeps the test split's lists in the record as ``test_outcomes`` (0/1 values as a
hex bit string, 500 examples in 125 characters; other values as a list) and drops the validation ones.
``summary`` pairs them across arms and seeds (``verdicts.crossed``) only when the records carry the same
``order``: a fingerprint of the test batches the outcomes were scored on (every tensor and string in them, in
order), so that a changed tokenizer, data or example order never pairs outcomes of different examples.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any


def split(result: dict[str, Any], where: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``(metrics, outcomes)`` from an ``evaluate`` result; ``ValueError`` naming ``where`` when an outcome list
    does not average to its metric."""
    metrics = dict(result)
    outcomes = metrics.pop("outcomes", None) or {}
    if not isinstance(outcomes, dict):
        raise ValueError(f"{where}: evaluate's 'outcomes' must map metric names to lists, got "
                         f"{type(outcomes).__name__}")
    for name, values in outcomes.items():
        if name not in metrics:
            raise ValueError(f"{where}: evaluate returned outcomes for {name!r}, which is not one of its metrics "
                             f"{sorted(metrics)}")
        vals = [float(v) for v in values]
        if not vals or not math.isclose(sum(vals) / len(vals), float(metrics[name]), rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"{where}: the mean of the {len(vals)} outcomes for {name!r} is not the metric "
                             f"{metrics[name]!r}; outcomes must be the per-example values the metric averages")
    return metrics, outcomes


def fingerprint(batches: list[Any]) -> str:
    """A hash of the batches' contents in order (tensors by dtype, shape and bytes; strings; other values by
    ``repr``): equal for two runs exactly when they scored the same examples in the same order."""
    import torch

    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"[{len(v)}".encode())
            for x in v:
                feed(x)
        else:
            h.update(repr(v).encode())

    feed(list(batches))
    return h.hexdigest()[:16]


def encode(values: list[float], order: str | None = None) -> dict[str, Any]:
    """Compact form for a record: ``{"n", "bits"}`` (hex, first example in the highest bit) for 0/1 values,
    else ``{"n", "values"}``; with ``order`` (:func:`fingerprint` of the batches) kept beside them."""
    vals = [float(v) for v in values]
    if all(v in (0.0, 1.0) for v in vals):
        bits = "".join("1" if v else "0" for v in vals)
        pad = -len(bits) % 4
        out = {"n": len(vals), "bits": f"{int(bits + '0' * pad, 2):0{(len(bits) + pad) // 4}x}" if vals else ""}
    else:
        out = {"n": len(vals), "values": vals}
    return out if order is None else {**out, "order": order}


def decode(stored: dict[str, Any]) -> list[float]:
    """The values :func:`encode` kept."""
    n = int(stored["n"])
    if "values" in stored:
        return [float(v) for v in stored["values"]]
    if n == 0:
        return []
    width = len(stored["bits"]) * 4
    bits = f"{int(stored['bits'], 16):0{width}b}"[:n]
    return [float(b == "1") for b in bits]
