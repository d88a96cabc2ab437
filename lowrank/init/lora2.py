"""LoRA²'s initialization (arXiv 2408.06854; the authors' ``SVDLinear.reset_parameters``), for the ``lora2``
adapter (:mod:`lowrank.adapters.lora2`): ``E = 0``; ``A1 (k, d_in)``, ``B1 (r, k)``, ``A2 (k, r)``, ``B2 (d_out, k)``
i.i.d. ``N(0, std^2)`` with ``std = 0.02``, from the layer's seeded generator. The update ``c B2 A2 diag(E) B1 A1`` is
0 at step 0 (``E = 0``), the output unchanged. ``InitResult.A`` / ``.B`` carry the planes ``B1 A1`` and ``B2 A2``."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext


@register_initializer("lora2")
class LoRA2Init(Initializer):
    """LoRA² (arXiv 2408.06854): E = 0, the four plane factors N(0, 0.02^2)."""

    offset = False
    adapter_kinds = ("lora2",)

    @dataclass(frozen=True)
    class Options:
        std: float = 0.02
        """Standard deviation of the plane factors (the authors' code: 0.02)."""
        k: int = 8
        """Inner rank of each plane: must equal the adapter's ``k`` (``adapter_options``)."""
        e_std: float = 0.0
        """Standard deviation of ``E`` (0: zeros, the method's init; > 0 for tests and ablations: the update is then
        non-zero at step 0)."""

        def __post_init__(self):
            if not (isinstance(self.std, (int, float)) and self.std > 0):
                raise ValueError(f"invalid std={self.std!r}: must be > 0")
            if not (isinstance(self.e_std, (int, float)) and self.e_std >= 0):
                raise ValueError(f"invalid e_std={self.e_std!r}: must be >= 0 (0: E = 0)")
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise ValueError(f"invalid k={self.k!r}: a positive integer (the adapter's k)")

    def init_layer(self, ctx: LayerContext) -> InitResult:
        k, r, s = self.options.k, ctx.rank, self.options.std
        A1, B1, A2, B2 = s * ctx.randn(k, ctx.n), s * ctx.randn(r, k), s * ctx.randn(k, r), s * ctx.randn(ctx.m, k)
        E = self.options.e_std * ctx.randn(r) if self.options.e_std else ctx.zeros(r)
        return InitResult(A=B1 @ A1, B=B2 @ A2, extras={"A1": A1, "B1": B1, "E": E, "A2": A2, "B2": B2})
