"""The identity preconditioner: gradients pass through unchanged (plain LoRA training)."""

from __future__ import annotations

from ..registry import register_preconditioner
from .base import Preconditioner


@register_preconditioner("identity")
class Identity(Preconditioner):
    """No preconditioning: ``(grad_A, grad_B)`` unchanged; with AdamW, bitwise equal to plain AdamW."""

    transforms_gradients = False
    adapter_kinds = ("factors", "latent", "blockwise", "random_basis", "kasa", "lora2", "reslora")  # nothing to transform: any adapter

    def update(self, grad_A, grad_B, A, B, scaling, state):
        return grad_A, grad_B
