"""MiLoRA: Minor singular component LoRA.

Wang et al. 2024, arXiv 2406.09044. As PiSSA but with the *smallest* ``r`` singular triplets of
``W0 = U S V^T`` (``U_m``, ``S_m``, ``V_m``):

    B = U_m diag(sqrt(S_m / s)),  A = diag(sqrt(S_m / s)) V_m^T,  W = W0 - U_m S_m V_m^T

so the frozen ``W`` keeps the principal components (``||W||_2 = sigma_1(W0)``) and the adapter
starts on the minor ones. Full SVD (randomized methods find the largest triplets, not the smallest).
"""

from __future__ import annotations

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext
from .pissa import balanced_factors
from .svd import bottom_svd


@register_initializer("milora")
class MiLoRA(Initializer):
    """MiLoRA (arXiv 2406.09044): adapt the minor (smallest) r singular components of W0."""

    offset = True

    def init_layer(self, ctx: LayerContext) -> InitResult:
        A, B = balanced_factors(*bottom_svd(ctx.weight, ctx.rank), ctx.scaling)
        return InitResult(A=A, B=B, offset=True)
