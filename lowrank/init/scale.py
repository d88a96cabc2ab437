"""Scale factors ``c`` applied to both unit-norm factors (``A = c V^T``, ``B = c U``).

From LoRA-GA (Wang, Yu, Li 2024, arXiv 2407.05000, Sec. 3.3 and the reference code); they
compose with any source of orthonormal directions (gradient singular vectors, random frames).
With ``s`` the adapter scale, the first LoRA step is ``zeta * G_2r`` with ``zeta = s^2 c^2``:

- ``stable``: ``c = m^(1/4) / sqrt(gamma)``: with rsLoRA the adapter's output has a per-coordinate
  second moment ``alpha^2 / gamma^2`` independent of rank and width (``zeta = s^2 sqrt(m) / gamma``).
- ``gd``: ``c = 1 / s``: the first step equals SGD's on ``G_2r`` (``zeta = 1``).
- ``unit``: ``c = 1``.
- ``weight``: ``c = mean_{i<r} sqrt(sigma_i(W0) / s)``: factors at the scale of the weight's top singular values.
"""

from __future__ import annotations

import math

import torch

SCALES = ("stable", "gd", "unit", "weight")


def scale_factor(kind: str, *, m: int, rank: int, scaling: float, gamma: float,
                 weight: torch.Tensor | None = None) -> float:
    """``c`` for a layer with ``d_out = m``, rank ``r``, scale ``s``; ``weight`` (``W0``) only for ``"weight"``."""
    if kind == "stable":
        return m ** 0.25 / math.sqrt(gamma)
    if kind == "gd":
        return 1.0 / scaling
    if kind == "unit":
        return 1.0
    if kind == "weight":
        sigma = torch.linalg.svdvals(weight.float())[:rank]
        return torch.sqrt(sigma / scaling).mean().item()
    raise ValueError(f"invalid scale {kind!r}: must be one of {SCALES}")


def check_scale(kind: str | None, gamma: float, *, allow_none: bool = False) -> None:
    """Validate a ``scale`` option (and ``stable_gamma``) with a clear message."""
    valid = SCALES + ((None,) if allow_none else ())
    if kind not in valid:
        raise ValueError(f"invalid scale={kind!r}: must be one of {valid}")
    if not (isinstance(gamma, (int, float)) and gamma > 0):
        raise ValueError(f"invalid stable_gamma={gamma!r}: must be > 0")
