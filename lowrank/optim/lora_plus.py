"""LoRA+: a larger learning rate for ``B`` than for ``A``.

Hayou, Ghosh, Yu 2024, arXiv 2402.12354: ``lr_B = ratio * lr_A`` (ratio ~ 16 recommended), for
efficient feature learning at large width. Implemented through the base optimizer's param
groups (so it is exact for Adam too, where rescaling a gradient would change nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..registry import register_preconditioner
from .base import Preconditioner


@register_preconditioner("lora_plus")
class LoRAPlus(Preconditioner):
    """LoRA+ (arXiv 2402.12354): ``lr_B = ratio * lr_A``; gradients unchanged."""

    transforms_gradients = False

    @dataclass(frozen=True)
    class Options:
        ratio: float = 16.0
        """``lr_B / lr_A``."""

        def __post_init__(self):
            if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and self.ratio > 0):
                raise ValueError(f"invalid ratio={self.ratio!r}: must be a finite number > 0 (the paper uses 16)")

    def lr_multipliers(self) -> tuple[float, float]:
        return 1.0, float(self.options.ratio)

    def update(self, grad_A, grad_B, A, B, scaling, state):
        return grad_A, grad_B
