"""Gaussian LoRA init (PEFT's ``init_lora_weights="gaussian"``).

    A ~ N(0, std^2)   (default std = 1 / r, as PEFT)
    B = 0
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext


@register_initializer("gaussian")
class Gaussian(Initializer):
    """Gaussian A (std 1/r by default), zero B."""

    @dataclass(frozen=True)
    class Options:
        std: float | None = None
        """Standard deviation of A's entries; None means 1 / r."""

        def __post_init__(self):
            if self.std is not None and not self.std > 0:
                raise ValueError(f"invalid std={self.std!r}: must be > 0 (or None for 1/r)")

    def init_layer(self, ctx: LayerContext) -> InitResult:
        std = self.options.std if self.options.std is not None else 1.0 / ctx.rank
        return InitResult(A=std * ctx.randn(ctx.rank, ctx.n), B=ctx.zeros(ctx.m, ctx.rank))
