"""MiCA: Minor Component Adaptation (arXiv 2604.01694), as PEFT 0.21 implements it (``init_lora_weights="mica"``).

With the thin SVD ``W0 = U S V^T`` (singular values descending) and ``U_m = U[:, -r:]``, the left singular
vectors of the ``r`` smallest singular values:

    B = U_m  (d_out, r), frozen for the whole training        A = 0  (r, d_in), trained

so ``s B A = 0`` at initialization (no offset) and every update ``s U_m dA`` lies in the span of ``W0``'s minor
output directions: the adapter writes where the pretrained weight is weakest (MiLoRA's idea, arXiv 2406.09044,
with a fixed ``B`` instead of an offset trained pair). ``B`` is declared ``frozen``: ``inject`` and
``load_adapter`` turn its ``requires_grad`` off and :class:`lowrank.optim.PreconditionedOptimizer` leaves it out
(preconditioners that transform ``(grad_A, grad_B)`` together are refused; ``identity`` and ``lora_plus`` apply).
Full SVD in float32, as PEFT (randomized methods find the largest triplets, not the smallest).
``tests/test_mica.py`` checks ``B`` against PEFT's and a float64 reference.
"""

from __future__ import annotations

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext
from .svd import bottom_svd


@register_initializer("mica")
class MiCA(Initializer):
    """MiCA (arXiv 2604.01694): B = the r minor left singular vectors of W0, frozen; A = 0, trained."""

    offset = False
    frozen = ("B",)

    def init_layer(self, ctx: LayerContext) -> InitResult:
        U, _, _ = bottom_svd(ctx.weight, ctx.rank)  # (m, r)
        return InitResult(A=ctx.zeros(ctx.rank, ctx.n), B=U.contiguous().to(ctx.device))
