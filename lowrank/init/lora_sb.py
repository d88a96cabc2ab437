"""LoRA-SB: LoRA-XS's form initialized from an estimate of the first full fine-tuning update
(Ponkshe et al. 2024, "Initialization using update approximation is a silver bullet for extreme
efficient low-rank fine-tuning", arXiv 2411.19557).

With ``G`` the mean gradient over a few batches (``lowrank``'s hook estimator) and the first update of
full fine-tuning with Adam, ``dW = -eta sign(G)`` (Adam's first, bias-corrected step;
``update="gradient"`` uses SGD's ``-eta G`` instead), ``dW ~ U S V^T`` (top ``r``)::

    B = U_r,   A = V_r^T,   R = S_r / s        so  s B R A = dW_r  (the best rank-r approximation of dW)

``A`` and ``B`` stay frozen and only ``R`` trains; the base is not offset, so the model starts where
full fine-tuning's first step would have taken it (projected to rank ``r``): ``preserves_output`` is False.
Training ``R`` then moves ``s B R A`` inside the span of the first update's top singular directions.

Where the reference implementation (github.com/CERT-Lab/lora-sb) differs: it sums per-sample
gradients over a given number of samples (the sign is the same as the mean's), sets ``eta`` to
``lr / warmup_steps``, fixes ``s = 1`` (``alpha = r``) and puts ``R = S_r`` (equal to ``S_r / s`` there),
uses a randomized SVD (``torch.svd_lowrank``, 10 iterations) rounded to bfloat16, and reseeds the
global RNG; here the SVD is exact, any ``s`` works, and the global RNG is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, LayerContext
from .gradient import GradientInitializer, GradientOptions
from .svd import top_svd


@register_initializer("lora_sb")
class LoRASB(GradientInitializer):
    """LoRA-SB (arXiv 2411.19557): frozen B = U_r, A = V_r^T of dW = -eta sign(G); trained R = S_r / s."""

    offset = False

    adapter_kinds = ("latent",)
    preserves_output = False

    @dataclass(frozen=True)
    class Options(GradientOptions):
        eta: float = 1e-3
        """The learning rate of the approximated first step (the reference code: lr / warmup steps)."""
        update: str = "sign"
        """``"sign"``: Adam's first step ``-eta sign(G)`` (the paper); ``"gradient"``: SGD's ``-eta G``."""

        def __post_init__(self):
            super().__post_init__()
            if not self.eta > 0:
                raise ValueError(f"invalid eta={self.eta!r}: must be > 0")
            if self.update not in ("sign", "gradient"):
                raise ValueError(f"invalid update={self.update!r}: choose 'sign' or 'gradient'")

    def init_layer(self, ctx: LayerContext) -> InitResult:
        G = ctx.gradient()
        dW = -self.options.eta * (torch.sign(G) if self.options.update == "sign" else G)
        U, S, V = top_svd(dW, ctx.rank)
        return InitResult(A=V.T.contiguous().to(ctx.device), B=U.to(ctx.device),
                          extras={"R": torch.diag(S / ctx.scaling).to(ctx.device)})
