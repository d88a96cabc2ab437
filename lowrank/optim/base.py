"""``Preconditioner``: the extension point for LoRA gradient transformations.

In the spirit of optax's gradient transformations: a preconditioner maps each adapted layer's
``(grad_A, grad_B)``, given the current ``(A, B, scaling)`` and its own per-layer state, to the
directions the base optimizer (SGD, AdamW, ...) then steps along. It has no learning rate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._options import build_options


class Preconditioner(ABC):
    """Base class of gradient preconditioners for LoRA factors."""

    @dataclass(frozen=True)
    class Options:
        """No options."""

    registry_name: ClassVar[str] = "?"

    def __init__(self, **options: Any):
        self.options = build_options(self.Options, options, "preconditioner", self.registry_name)

    def init_state(self, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer state (tensors only, so it round-trips through ``state_dict``)."""
        return {}

    @abstractmethod
    def update(self, grad_A: torch.Tensor, grad_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scaling: float, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the transformed ``(grad_A (r, d_in), grad_B (d_out, r))``."""
