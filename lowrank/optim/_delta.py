"""The ``delta`` damping option shared by the Gram-matrix preconditioners."""

from __future__ import annotations

import math
from dataclasses import dataclass


def check_delta(delta) -> None:
    if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and math.isfinite(delta) and delta >= 0):
        raise ValueError(f"invalid delta={delta!r}: must be a finite number >= 0 (0 = the exact method)")


@dataclass(frozen=True)
class DeltaOptions:
    delta: float = 0.0
    """Damping added to the ``r x r`` Gram matrices (``B^T B``, ``A A^T``) before the pseudo-inverse; 0: exact."""

    def __post_init__(self):
        check_delta(self.delta)
