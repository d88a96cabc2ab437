"""Vanilla LoRA (Hu et al. 2021, arXiv 2106.09685), as in the reference code and PEFT.

    A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))   (kaiming-uniform with a = sqrt(5))
    B = 0                                 (so s B A = 0 and the output is unchanged)
"""

from __future__ import annotations

import math

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext


def kaiming_A(ctx: LayerContext):
    """Vanilla LoRA's ``A``: ``U(-1/sqrt(d_in), 1/sqrt(d_in))``, ``(r, d_in)``, from the layer's generator."""
    bound = 1.0 / math.sqrt(ctx.n)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in)
    return (2.0 * ctx.rand(ctx.rank, ctx.n) - 1.0) * bound


@register_initializer("kaiming")
class Kaiming(Initializer):
    """Vanilla LoRA: kaiming-uniform A, zero B (the default)."""

    offset = False
    adapter_kinds = ("factors", "reslora")  # ResLoRA's layers start as vanilla LoRA

    def init_layer(self, ctx: LayerContext) -> InitResult:
        return InitResult(A=kaiming_A(ctx), B=ctx.zeros(ctx.m, ctx.rank))
