"""Orthogonal LoRA initialization, as PEFT 0.21 implements it (``init_lora_weights="orthogonal"``; the idea from
D. Datta's note "Rethinking LoRA initialisation", https://datta0.github.io/posts/rethink-lora-init/).

With ``Q`` the orthogonal factor of the QR decomposition of an ``r x r`` Gaussian matrix, ``Q_odd = Q[0::2]`` and
``Q_even = Q[1::2]`` (``r/2`` rows each, and ``Q_even Q_odd^T = 0``), and Gaussian ``R_A (d_in, r/2)``,
``R_B (r/2, d_out)``:

    A = c (R_A Q_odd)^T       (r, d_in)
    B = c R_B^T Q_even         (d_out, r)         c = 1/10 (PEFT's constant)

so ``B A = c^2 R_B^T (Q_even Q_odd^T) R_A^T = 0`` (to rounding): both factors are non-zero (both get gradient from
step 1, unlike vanilla LoRA's ``B = 0``), the output is unchanged and no offset is needed. The rank must be
even. The draws come from the layer's seeded generator, in PEFT's order (``Q``'s matrix, ``R_A``, ``R_B``): a
generator seeded ``k`` gives PEFT's factors after ``torch.manual_seed(k)`` (``tests/test_orthogonal.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext


def orthogonal_factors(m: int, n: int, rank: int, generator: torch.Generator,
                       scale: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (rank, n), B (m, rank))`` float32 with ``B A = 0`` (module docstring), drawn from ``generator``."""
    Q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator))
    q_odd, q_even = Q[0::2, :], Q[1::2, :]  # (r/2, r) each
    A = (torch.randn(n, rank // 2, generator=generator) @ q_odd).T * scale
    B = torch.randn(rank // 2, m, generator=generator).T @ q_even * scale
    return A, B


@register_initializer("orthogonal")
class Orthogonal(Initializer):
    """PEFT's orthogonal init: ``A``, ``B`` non-zero from complementary rows of one orthogonal matrix, ``B A = 0``."""

    offset = False

    @dataclass(frozen=True)
    class Options:
        scale: float = 0.1
        """``c`` on both factors (PEFT divides by 10)."""

        def __post_init__(self):
            if not self.scale > 0:
                raise ValueError(f"invalid scale={self.scale!r}: must be > 0")

    def check_layer(self, ctx: LayerContext) -> None:
        if ctx.rank % 2:
            raise ValueError(f"orthogonal needs an even rank (A and B take alternate rows of one r x r orthogonal "
                             f"matrix), but layer {ctx.name!r} has rank {ctx.rank}; use rank {ctx.rank + 1} or "
                             f"{max(2, ctx.rank - 1)} (rank_pattern for one layer)")

    def init_layer(self, ctx: LayerContext) -> InitResult:
        A, B = orthogonal_factors(ctx.m, ctx.n, ctx.rank, ctx.generator, self.options.scale)
        return InitResult(A=A.to(ctx.device), B=B.to(ctx.device))
