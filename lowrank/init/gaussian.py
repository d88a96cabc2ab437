"""Gaussian LoRA init, and the random-direction arms of the LoRA-GA ablation.

Default (PEFT's ``init_lora_weights="gaussian"``):

    A ~ N(0, std^2)  (std = 1 / r),   B = 0

Options that compose (LoRA-GA, arXiv 2407.05000, Sec. 4.3 ablation):

- ``b_std > 0``: ``B ~ N(0, b_std^2)`` too, and the base is offset, ``W = W0 - s B A``
  (the paper's "Gaussian" arm: non-zero A and B).
- ``scale="stable" | "gd" | "unit" | "weight"``: random orthonormal directions (rows of ``A``,
  columns of ``B``, from QR of Gaussian matrices) times the factor ``c`` of
  ``lowrank.init.scale``, offset base (``scale="stable"`` is the "+SO" arm). ``std``/``b_std``
  are then unused.
- ``offset``: override whether the base is offset (default: whenever ``B != 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext
from .scale import check_scale, scale_factor


def random_frame(rows: int, cols: int, ctx: LayerContext) -> torch.Tensor:
    """A ``(rows, cols)`` matrix with orthonormal columns (``rows >= cols``), Haar-distributed."""
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=ctx.generator))
    return (Q * torch.sign(torch.diagonal(R))[None, :]).to(ctx.device)


@register_initializer("gaussian")
class Gaussian(Initializer):
    """Gaussian A (std 1/r), zero B; options give non-zero B, random orthonormal frames with a LoRA-GA scale, offset."""

    @dataclass(frozen=True)
    class Options:
        std: float | None = None
        """Standard deviation of A's entries; None means 1 / r."""
        b_std: float = 0.0
        """Standard deviation of B's entries; 0 keeps B = 0."""
        scale: str | None = None
        """None, or a LoRA-GA scale (stable, gd, unit, weight) on random orthonormal A and B."""
        stable_gamma: float = 16.0
        """``gamma`` of the stable scale."""
        offset: bool | None = None
        """Offset the base, W = W0 - s B A (None: whenever B != 0)."""

        def __post_init__(self):
            if self.std is not None and not self.std > 0:
                raise ValueError(f"invalid std={self.std!r}: must be > 0 (or None for 1/r)")
            if not self.b_std >= 0:
                raise ValueError(f"invalid b_std={self.b_std!r}: must be >= 0")
            check_scale(self.scale, self.stable_gamma, allow_none=True)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        nonzero_b = o.b_std > 0 or o.scale is not None
        self.offset = nonzero_b if o.offset is None else o.offset
        self.preserves_output = self.offset or not nonzero_b

    def init_layer(self, ctx: LayerContext) -> InitResult:
        o, r = self.options, ctx.rank
        if o.scale is not None:
            c = scale_factor(o.scale, m=ctx.m, rank=r, scaling=ctx.scaling, gamma=o.stable_gamma,
                             weight=ctx.weight if o.scale == "weight" else None)
            A = c * random_frame(ctx.n, r, ctx).T  # (r, n), orthonormal rows
            B = c * random_frame(ctx.m, r, ctx)  # (m, r), orthonormal columns
        else:
            A = (o.std if o.std is not None else 1.0 / r) * ctx.randn(r, ctx.n)
            B = o.b_std * ctx.randn(ctx.m, r) if o.b_std > 0 else ctx.zeros(ctx.m, r)
        return InitResult(A=A, B=B, offset=self.offset)
