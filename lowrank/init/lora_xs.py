"""LoRA-XS initialization: the top-``r`` SVD of the pretrained weight (Bałazy et al. 2024, arXiv 2405.17604).

With ``W0 = U S V^T`` (``(d_out, d_in)``)::

    B = U_r          (d_out, r)  frozen
    A = S_r V_r^T    (r, d_in)   frozen (the singular values sit on the input side, as in the paper and
                                 its reference code: there W = W0^T and ``A = U_r Sigma_r``)
    R = 0            (r, r)      trained; the output is unchanged at step 0

The reference code draws ``R ~ N(0, 1e-5^2)`` instead of zeros (``r_std``), computes the SVD with
scikit-learn's randomized ``TruncatedSVD`` (10 iterations) and does not offset ``W0``; the exact SVD
here is the limit it approximates.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext
from .svd import top_svd


@register_initializer("lora_xs")
class LoRAXS(Initializer):
    """LoRA-XS (arXiv 2405.17604): frozen B = U_r, A = S_r V_r^T from W0; trained R starts at 0."""

    offset = False

    adapter_kinds = ("latent",)

    @dataclass(frozen=True)
    class Options:
        r_std: float = 0.0
        """Standard deviation of ``R``'s entries (0: zeros, the output is unchanged; the reference code uses 1e-5)."""

        def __post_init__(self):
            if self.r_std < 0:
                raise ValueError(f"invalid r_std={self.r_std!r}: must be >= 0")

    def __init__(self, **options):
        super().__init__(**options)
        self.preserves_output = self.options.r_std == 0

    def init_layer(self, ctx: LayerContext) -> InitResult:
        U, S, V = top_svd(ctx.weight, ctx.rank)
        R = self.options.r_std * ctx.randn(ctx.rank, ctx.rank)
        return InitResult(A=(S[:, None] * V.T).to(ctx.device), B=U.to(ctx.device), extras={"R": R})
