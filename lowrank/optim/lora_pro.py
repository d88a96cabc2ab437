"""LoRA-Pro: factor gradients whose equivalent full-weight gradient is the best possible.

Wang, Liang, Tan 2024, arXiv 2407.18242. A LoRA step with factor
directions ``(g_A, g_B)`` moves ``W`` along the *equivalent gradient* ``s (B g_A + g_B A)``.
LoRA-Pro picks the directions that make it closest to ``G``::

    g_A = (1/s^2) (B^T B)^-1 grad_A + X A
    g_B = (1/s^2) (I - P_B) grad_B (A A^T)^-1 - B X
    B^T B X + X A A^T = -(1/s^2) (B^T B)^-1 grad_A A^T       (Sylvester; fixes the free X)

so that ``s (B g_A + g_B A) = P_B G + G P_A - P_B G P_A``: the projection of ``G`` onto the
tangent space of the rank-``r`` manifold at ``B A``. Exact for SGD.

Inverses are pseudo-inverses (``lowrank.optim.linalg``): at ``B = 0`` this gives ``g_A = 0``,
``X = 0`` and the equivalent gradient ``G P_A``, which is the tangent projection there.

With Adam/AdamW as the base, these directions feed Adam's per-coordinate moments. That is not
the paper's Adam variant, which keeps Adam's moments of the *equivalent gradient* in full
``(m, n)`` size (two ``m x n`` float32 buffers per layer, i.e. the memory of full fine-tuning's
optimizer state, and ``O(m n r)`` extra work per step) and maps the Adam step back to the
factors; it is not implemented here.
"""

from __future__ import annotations

import warnings

import torch

from ..registry import register_preconditioner
from ._delta import DeltaOptions
from .base import BatchedPreconditioner, LayerGrads
from .linalg import grouped, psd_pinv, sylvester_psd


def lora_pro_directions(grad_A: torch.Tensor, grad_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        scaling: float, delta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g_A, g_B, X)`` of LoRA-Pro for one layer (see the module docstring)."""
    return _directions([LayerGrads(grad_A, grad_B, A, B, scaling, {})], delta)[0]


def _directions(layers: list[LayerGrads], delta: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    BtB = [layer.B.T @ layer.B for layer in layers]
    AAt = [layer.A @ layer.A.T for layer in layers]
    inv_B, inv_A = grouped(psd_pinv, BtB, delta=delta), grouped(psd_pinv, AAt, delta=delta)
    a0 = [iB @ layer.grad_A / layer.scaling ** 2 for layer, iB in zip(layers, inv_B)]
    X = grouped(sylvester_psd, BtB, AAt, [-(a @ layer.A.T) for a, layer in zip(a0, layers)], delta=delta)
    out = []
    for layer, a, iB, iA, x in zip(layers, a0, inv_B, inv_A, X):
        B, gB = layer.B, layer.grad_B
        b0 = (gB - B @ (iB @ (B.T @ gB))) @ iA / layer.scaling ** 2
        out.append((a + x @ layer.A, b0 - B @ x, x))
    return out


@register_preconditioner("lora_pro")
class LoRAPro(BatchedPreconditioner):
    """LoRA-Pro (arXiv 2407.18242): equivalent gradient = tangent-space projection of ``G`` (exact for SGD)."""

    Options = DeltaOptions

    def update_many(self, layers):
        if any(layer.grad_A is None for layer in layers):
            raise ValueError("lora_pro needs grad_A; it cannot be chained with a preconditioner that freezes A")
        return [(gA, gB) for gA, gB, _ in _directions(layers, self.options.delta)]

    def note_base(self, base: type) -> None:
        """Say plainly what LoRA-Pro means under an adaptive base."""
        if not issubclass(base, torch.optim.SGD):
            warnings.warn(f"lora_pro with {base.__name__}: the SGD-exact LoRA-Pro directions are fed to "
                          f"{base.__name__}'s per-coordinate moments; the paper's Adam variant (full-size moments of "
                          "the equivalent gradient) is not implemented", stacklevel=4)
