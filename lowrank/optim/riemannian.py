"""Riemannian preconditioning of LoRA (scaled GD; scaled AdamW when the base is Adam/AdamW).

Zhang & Pilanci 2024, arXiv 2402.02347::

    g_A = (B^T B + delta I)^-1 grad_A        g_B = grad_B (A A^T + delta I)^-1

With ``delta = 0`` the first-order change of ``s B A`` under SGD is ``-lr s^2 (P_B G + G P_A)``:
it depends only on the column space of ``B`` and the row space of ``A``, so it is invariant
under ``(B, A) -> (B R, R^-1 A)``; plain GD is not. With Adam/AdamW as the base, the
preconditioned gradients feed Adam's moments ("scaled AdamW").

Inverses are damped pseudo-inverses (``lowrank.optim.linalg``): at ``B = 0`` (vanilla init)
``(B^T B)^+ = 0``, so ``g_A = 0`` for that step (``grad_A = s B^T G`` is 0 there anyway).
The default ``delta = 1e-6`` is the reference implementation's damping; ``0`` is the exact method.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_preconditioner
from ._delta import DeltaOptions
from .base import BatchedPreconditioner
from .linalg import grouped, psd_pinv


@register_preconditioner("riemannian")
class Riemannian(BatchedPreconditioner):
    """Scaled GD / scaled AdamW (arXiv 2402.02347): ``g_A = (B^T B)^-1 grad_A``, ``g_B = grad_B (A A^T)^-1``."""

    @dataclass(frozen=True)
    class Options(DeltaOptions):
        delta: float = 1e-6
        """Damping added to the ``r x r`` Gram matrices (the reference implementation's; 0: exact)."""

    def update_many(self, layers):
        delta = self.options.delta
        inv_B = grouped(psd_pinv, [layer.B.T @ layer.B for layer in layers], delta=delta)  # (B^T B + delta I)^+
        inv_A = grouped(psd_pinv, [layer.A @ layer.A.T for layer in layers], delta=delta)  # (A A^T + delta I)^+
        return [(None if layer.grad_A is None else iB @ layer.grad_A, layer.grad_B @ iA)
                for layer, iB, iA in zip(layers, inv_B, inv_A)]
