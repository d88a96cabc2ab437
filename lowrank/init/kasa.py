"""KaSA's initialization (Wang et al. 2024, arXiv 2412.06071; PEFT 0.21's ``KasaLinearVariant.init`` after LoRA's
default ``init_lora_weights=True``), for the ``kasa`` adapter (:mod:`lowrank.adapters.kasa`).

With ``W0 = U S V^T`` (``(d_out, d_in)``, ``k = min(d_out, d_in)``, the ``r`` smallest triplets ``U_m``, ``S_m``,
``V_m``)::

    A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))   (r, d_in): Kaiming-uniform with a = sqrt(5), as ``kaiming``
    B = 0                                 (d_out, r)
    d ~ N(0, 1)                           (r,): the trainable singular values (PEFT's ``lora_diag``)
    W = W0 - U_m diag(S_m) V_m^T          the top k - r part of W0 ("knowledge-based SVD truncation")

The truncation is the offset ``W = W0 - s B0 A0`` with MiLoRA's balanced factors of the minor triplets,
``B0 = U_m diag(sqrt(S_m / s))``, ``A0 = diag(sqrt(S_m / s)) V_m^T``: lowrank keeps them, so the original ``W0``
can be restored and rebuilt. The update is zero at step 0 (``B = 0``) but the base lost its minor part, so the
output moves by ``-U_m diag(S_m) V_m^T x`` (``preserves_output = False``), as in PEFT and the paper. ``r`` must be
below ``min(d_out, d_in)`` (at least one triplet is kept). Full SVD (the smallest triplets are needed). The
truncation is not always small: on SmolLM2-135M (4-bit-quantized weights) at ``r = 8`` it raises the validation
loss from 5.85 to 12.35 before training, mostly through ``v_proj`` (narrow: 192 triplets, of which the 8 minor hold
7-10% of the norm) and ``down_proj`` (``python -m experiments.truncation_check``); check a model first. Option
``b_std > 0`` draws ``B ~ N(0, b_std^2)`` instead of zeros (after ``A`` and ``d``), for tests and ablations.

PEFT and the reference code draw ``A`` and ``d`` from the global RNG; here they come from the layer's seeded
generator. Other departures (PEFT's destructive truncation, ``Conv1D``, the reference code's ``d_in - r``
triplets) are listed in :mod:`lowrank.adapters.kasa`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_initializer
from .base import InitResult, LayerContext
from .kaiming import Kaiming
from .pissa import balanced_factors
from .svd import bottom_svd


@register_initializer("kasa")
class KaSAInit(Kaiming):
    """KaSA (arXiv 2412.06071): drop W0's r minor singular triplets; Kaiming A, zero B, N(0, 1) singular values."""

    offset = True
    preserves_output = False
    adapter_kinds = ("kasa",)

    @dataclass(frozen=True)
    class Options:
        b_std: float = 0.0
        """Standard deviation of ``B``'s entries (0: zeros, PEFT's init; > 0 for tests and ablations: the update
        ``s B diag(d) A`` is then non-zero at step 0, on top of the truncation)."""

        def __post_init__(self):
            if self.b_std < 0:
                raise ValueError(f"invalid b_std={self.b_std!r}: must be >= 0 (0: B = 0)")

    def check_layer(self, ctx: LayerContext) -> None:
        k = min(ctx.m, ctx.n)
        if ctx.rank >= k:
            raise ValueError(f"layer {ctx.name!r} (kasa): rank {ctx.rank} >= min(d_out, d_in) = min({ctx.m}, {ctx.n}) "
                             f"= {k}; KaSA drops the base weight's r smallest singular components and must keep at "
                             f"least one: use rank <= {k - 1} (or rank_pattern={{{ctx.name!r}: {k - 1}}})")

    def init_layer(self, ctx: LayerContext) -> InitResult:
        self.check_layer(ctx)
        res = super().init_layer(ctx)  # A Kaiming-uniform, B = 0 (drawn first from the layer's generator)
        diag = ctx.randn(ctx.rank)
        if self.options.b_std:
            res.B = self.options.b_std * ctx.randn(ctx.m, ctx.rank)
        A0, B0 = balanced_factors(*bottom_svd(ctx.weight, ctx.rank), ctx.scaling)
        return InitResult(A=res.A, B=res.B, offset=True, extras={"diag": diag},
                          offset_factors=(A0.to(ctx.device), B0.to(ctx.device)))
