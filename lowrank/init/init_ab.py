"""Init[AB]: both LoRA factors non-zero at initialization (Li et al. 2025, "Beyond Zero Initialization:
Investigating the Impact of Non-Zero Initialization on LoRA Fine-Tuning Dynamics", arXiv 2505.23194), as the re-test
at tuned rates runs it (arXiv 2602.04998, yuang-lee/lr-matters-lora ``run-lora/utils/init_AB_util.py``):

    A0 ~ U(-a / sqrt(d_in), a / sqrt(d_in))   (r, d_in)     (vanilla LoRA's Kaiming-uniform A at a = 1)
    B0 ~ U(-b / sqrt(d_in), b / sqrt(d_in))   (d_out, r)    (the same bound: the layer's d_in, not B's fan-in r)
    W  = W0 - s B0 A0                          (``offset=True``, the re-test's default: the output is unchanged)

with ``a = b = 1`` there (the re-test hard-codes them). Both factors get gradient from the first step. The
paper's abstract reports that the noise ``s B0 A0`` left in the weights (``offset=False``) generally does not hurt
and that non-zero ``A B`` is more robust to small learning rates; its authors' code exposes the subtraction as an
option, as here. Deviation from the re-test: the offset is formed in float32 from the factors as stored and cast
once (``lowrank.weights``), as for every offset init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext


@register_initializer("init_ab")
class InitAB(Initializer):
    """Init[AB] (arXiv 2505.23194): uniform ``A`` and ``B`` with bound ``1 / sqrt(d_in)``, base offset."""

    @dataclass(frozen=True)
    class Options:
        a_scale: float = 1.0
        """``a``: ``A``'s bound is ``a / sqrt(d_in)``."""
        b_scale: float = 1.0
        """``b``: ``B``'s bound is ``b / sqrt(d_in)``."""
        offset: bool = True
        """Offset the base (``W0 - s B0 A0``, output unchanged); ``False`` leaves the noise in the output."""

        def __post_init__(self):
            for key in ("a_scale", "b_scale"):
                v = getattr(self, key)
                if not (math.isfinite(v) and v > 0):
                    raise ValueError(f"invalid {key}={v!r}: must be a finite number > 0 (the re-test uses 1)")

    def __init__(self, **options):
        super().__init__(**options)
        self.offset = self.options.offset
        self.preserves_output = self.options.offset

    def init_layer(self, ctx: LayerContext) -> InitResult:
        o, bound = self.options, 1.0 / math.sqrt(ctx.n)
        A = (2.0 * ctx.rand(ctx.rank, ctx.n) - 1.0) * (o.a_scale * bound)  # (r, n)
        B = (2.0 * ctx.rand(ctx.m, ctx.rank) - 1.0) * (o.b_scale * bound)  # (m, r)
        return InitResult(A=A, B=B, offset=o.offset)
