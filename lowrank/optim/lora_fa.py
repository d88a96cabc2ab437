"""LoRA-FA: ``A`` frozen at its initialization, ``B`` trained with a preconditioned gradient.

Zhang et al. 2023, arXiv 2308.03303 (frozen ``A``), with the optimal-gradient form analysed in
LoRA-Pro (arXiv 2407.18242)::

    g_B = (1/s^2) grad_B (A A^T)^-1

so that the equivalent gradient ``s g_B A = G P_A``, the projection of ``G`` onto the row
space of ``A``. ``A`` is not given to the base optimizer and its ``requires_grad`` is turned
off (no gradient is computed for it; ``PreconditionedOptimizer.restore_requires_grad()`` turns it
back on). ``(A A^T)^-1`` is a damped pseudo-inverse.
"""

from __future__ import annotations


from ..registry import register_preconditioner
from ._delta import DeltaOptions
from .base import BatchedPreconditioner
from .linalg import grouped, psd_pinv


@register_preconditioner("lora_fa")
class LoRAFA(BatchedPreconditioner):
    """LoRA-FA (arXiv 2308.03303): ``A`` frozen; ``g_B = grad_B (A A^T)^-1 / s^2``."""

    trains_A = False

    Options = DeltaOptions

    def update_many(self, layers):
        inv_A = grouped(psd_pinv, [layer.A @ layer.A.T for layer in layers], delta=self.options.delta)
        return [(None, layer.grad_B @ iA / layer.scaling ** 2) for layer, iA in zip(layers, inv_A)]
