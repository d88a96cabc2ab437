"""LoRA-One: one gradient step at initialization, no offset.

Zhang et al. 2025, arXiv 2502.01235. With the mean gradient ``G`` and ``-G = U S V^T``:

    B = U_r diag(sqrt(S_r)) / sqrt(gamma sigma_1),   A = diag(sqrt(S_r)) V_r^T / sqrt(gamma sigma_1)

so ``s B A = -(s / (gamma sigma_1)) G_r``: the init *is* a (normalized) truncated gradient step,
and the base weight is left as it is: the model's output changes at step 0 by design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..registry import register_initializer
from .base import InitResult, LayerContext
from .gradient import GradientInitializer, GradientOptions


@register_initializer("lora_one")
class LoRAOne(GradientInitializer):
    """LoRA-One (arXiv 2502.01235): s B A = -(s / (gamma sigma_1)) G_r, base unchanged."""

    offset = False

    preserves_output = False
    sketchable = True

    def triplets(self, rank: int) -> int:
        return rank

    @dataclass(frozen=True)
    class Options(GradientOptions):
        gamma: float = 64.0
        """Step normalization: ``s B A = -(s / (gamma sigma_1(G))) G_r``."""

        def __post_init__(self):
            super().__post_init__()
            if not (isinstance(self.gamma, (int, float)) and self.gamma > 0):
                raise ValueError(f"invalid gamma={self.gamma!r}: must be > 0")

    def init_layer(self, ctx: LayerContext) -> InitResult:
        U, S, V = ctx.gradient_svd(ctx.rank)
        U = -U  # -G = (-U) S V^T
        norm = math.sqrt(self.options.gamma * S[0].item())
        root = S.sqrt() / norm
        A = root[:, None] * V.T  # (r, n)
        B = U * root[None, :]  # (m, r)
        return InitResult(A=A.to(ctx.device), B=B.to(ctx.device), offset=False)
