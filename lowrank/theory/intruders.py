"""Intruder dimensions (Shuttleworth, Andreas, Torralba, Sharma 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228): new high-ranking singular vectors of a fine-tuned weight that no pretrained
singular vector resembles.

With ``W0 = U0 S0 V0^T`` (pretrained) and ``W = U S V^T`` (fine-tuned), singular values descending, the ``j``-th
left singular vector of ``W`` is an intruder dimension when

    max_i |<u_j, u0_i>| < epsilon,        j < top_k

(``top_k`` the most important directions of ``W``; the absolute value because a singular vector's sign is
arbitrary). The paper ties them to forgetting: LoRA has them, full fine-tuning mostly does not. The test is the one
PEFT's ``peft.tuners.lora.intruders.reduce_intruder_dimension`` applies (left singular vectors, ``top_k=10``,
``epsilon=0.5``); the SVDs here are float64. On an adapted model the pretrained weight is the *original* ``W0``,
``W + s B0 A0`` for an offset init (PEFT compares with the offset base instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Intruders:
    """The intruder test of one weight pair."""

    count: int
    """How many of the top ``top_k`` singular vectors of the tuned weight are intruders."""
    indices: tuple[int, ...]
    """Their positions among the tuned weight's singular vectors (0 = the largest singular value)."""
    similarity: tuple[float, ...]
    """``max_i |<u_j, u0_i>|`` for each of the top ``top_k`` (``j = 0 .. top_k - 1``)."""


def _check(name: str, w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        what = f"a {w.dim()}-D tensor" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} must be a 2-D (d_out, d_in) tensor, got {what}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")


def intruder_dimensions(base_weight: torch.Tensor, tuned_weight: torch.Tensor, top_k: int = 10,
                        epsilon: float = 0.5) -> Intruders:
    """Intruder dimensions of ``tuned_weight`` against ``base_weight`` (both ``(d_out, d_in)``; module docstring)."""
    _check("base_weight", base_weight)
    _check("tuned_weight", tuned_weight)
    if base_weight.shape != tuned_weight.shape:
        raise ValueError(f"base_weight {tuple(base_weight.shape)} and tuned_weight {tuple(tuned_weight.shape)} "
                         "must have the same shape")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"invalid top_k={top_k!r}: must be a positive int")
    if not (isinstance(epsilon, (int, float)) and 0 < epsilon <= 1):
        raise ValueError(f"invalid epsilon={epsilon!r}: must be in (0, 1] (a cosine similarity)")
    U0 = torch.linalg.svd(base_weight.detach().double(), full_matrices=False)[0]  # (m, k)
    U = torch.linalg.svd(tuned_weight.detach().double(), full_matrices=False)[0]
    k = min(top_k, U.shape[1])
    sim = (U[:, :k].T @ U0).abs().max(dim=1).values  # (k,)
    idx = tuple(int(i) for i in torch.nonzero(sim < epsilon).flatten())
    return Intruders(count=len(idx), indices=idx, similarity=tuple(float(v) for v in sim))


def model_intruder_dimensions(model: nn.Module, top_k: int = 10, epsilon: float = 0.5) -> dict[str, Intruders]:
    """:func:`intruder_dimensions` of every adapted (unmerged) layer of ``model`` (after ``lowrank.inject`` and
    training): the original pretrained weight against the fine-tuned ``W + delta_weight()``."""
    from ..plan import adapted_layers
    from ..weights import original_weight

    layers = list(adapted_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no lowrank adapters; call lowrank.inject(model, config) first")
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"layer {merged[0]!r} is merged; call lowrank.unmerge(model) first (the update is then "
                         "known apart from the base)")
    out = {}
    with torch.no_grad():
        for name, layer in layers:
            dt = layer.compute_dtype
            tuned = layer.base_weight().to(dt) + layer.delta_weight(dt)
            out[name] = intruder_dimensions(original_weight(layer), tuned, top_k, epsilon)
    return out
