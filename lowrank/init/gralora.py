"""The ``gralora`` adapter's default initialization (GraLoRA, Jung et al. 2025, arXiv 2505.20355; PEFT's
``GraloraConfig(init_weights=True)``).

    A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))   (r, d_in): Kaiming-uniform with a = sqrt(5), as ``kaiming``
    B = 0                                 (d_out, r): so the update is 0 and the output is unchanged

``A``, ``B`` are the adapter's packed factors (block ``(i, j)`` reads ``A[group i, block j]`` and
``B[block i, group j]``; :mod:`lowrank.adapters.gralora`). PEFT draws each ``A`` block over its own fan-in
``d_in / k`` (bound ``sqrt(k / d_in)``, ``sqrt(k)`` times wider); an initializer does not see the adapter's ``k``,
so the bound here is LoRA's (PEFT's own for the hybrid rows). ``b_std > 0`` draws ``B ~ N(0, b_std^2)`` instead of
zeros (PEFT's ``init_weights=False`` draws ``B`` Kaiming-uniform, "for testing"): the output then moves at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_initializer
from .base import InitResult, LayerContext
from .kaiming import Kaiming


@register_initializer("gralora")
class GraLoRAInit(Kaiming):
    """GraLoRA (arXiv 2505.20355): Kaiming-uniform A, zero B for the gralora adapter (PEFT's default)."""

    adapter_kinds = ("blockwise",)

    @dataclass(frozen=True)
    class Options:
        b_std: float = 0.0
        """Standard deviation of ``B``'s entries (0: zeros, the output is unchanged)."""

        def __post_init__(self):
            if self.b_std < 0:
                raise ValueError(f"invalid b_std={self.b_std!r}: must be >= 0 (0: B = 0)")

    def __init__(self, **options):
        super().__init__(**options)
        self.preserves_output = self.options.b_std == 0

    def init_layer(self, ctx: LayerContext) -> InitResult:
        res = super().init_layer(ctx)
        if self.options.b_std:
            res.B = self.options.b_std * ctx.randn(ctx.m, ctx.rank)
        return res
