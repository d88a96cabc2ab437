"""The ``delta`` damping option shared by the Gram-matrix preconditioners."""

from __future__ import annotations

import math


def check_delta(delta) -> None:
    if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and math.isfinite(delta) and delta >= 0):
        raise ValueError(f"invalid delta={delta!r}: must be a finite number >= 0 (0 = the exact method)")
