"""``Preconditioner``: the extension point for LoRA gradient transformations.

In the spirit of optax's gradient transformations: a preconditioner maps each adapted layer's
``(grad_A, grad_B)``, given the current ``(A, B, scaling)`` and its own per-layer state, to the
directions the base optimizer (SGD, AdamW, ...) then steps along. It has no learning rate of
its own; a method that is about learning rates (LoRA+) says so through ``lr_multipliers``, and
one that freezes ``A`` (LoRA-FA) through ``trains_A``. ``lowrank.optim.PreconditionedOptimizer``
applies it before the base optimizer's step; ``chain`` composes several.

Conventions (as in ``docs/theory.md``): ``A`` is ``(r, n)``, ``B`` is ``(m, r)``, ``s`` the adapter
scale, ``grad_A = s B^T G`` and ``grad_B = s G A^T`` with ``G = dL/dW``. Tensors arrive in the
compute dtype (float32, or float64 for float64 adapters) and must be returned in it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from .._options import build_options
from .state import Update


class LayerGrads(NamedTuple):
    """One adapted layer's input to a preconditioner (compute dtype)."""

    grad_A: torch.Tensor | None
    grad_B: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    state: Any
    """The layer's state from ``init_state`` or the last ``Update``: read-only (a NamedTuple, or a mapping view
    that refuses writes)."""


class Preconditioner(ABC):
    """Base class of gradient preconditioners for LoRA factors.

    Subclass it, give it a frozen ``Options`` dataclass and an ``update``, and register it::

        @lowrank.register_preconditioner("half_b")
        class HalfB(lowrank.Preconditioner):
            def update(self, grad_A, grad_B, A, B, scaling, state):
                return grad_A, 0.5 * grad_B
    """

    @dataclass(frozen=True)
    class Options:
        """No options."""

    trains_A: ClassVar[bool] = True
    """``False``: ``A`` is frozen (not given to the base optimizer, ``grad_A`` is ``None``)."""
    transforms_gradients: ClassVar[bool] = True
    """``False``: ``update`` returns its gradients unchanged (the optimizer then skips it)."""
    registry_name: ClassVar[str] = "?"
    adapter_kinds: ClassVar[tuple[str, ...]] = ("factors",)
    """Adapter kinds (``Adapter.kind``) it can train: transforming ``(grad_A, grad_B)`` needs a trained pair."""

    def __init__(self, **options: Any):
        self.options = build_options(self.Options, options, "preconditioner", self.registry_name)

    def lr_multipliers(self) -> tuple[float, float]:
        """Learning-rate multipliers ``(for A, for B)`` applied through the base optimizer's param groups."""
        return 1.0, 1.0

    def init_state(self, A: torch.Tensor, B: torch.Tensor) -> Any:
        """Per-layer state: tensors, in a NamedTuple (typed) or a mapping (``lowrank.optim.state``), so it
        round-trips through ``state_dict``. Default: none (``{}``)."""
        return {}

    def note_base(self, base: type[torch.optim.Optimizer]) -> None:
        """Called once by ``PreconditionedOptimizer`` with the base optimizer's class (e.g. to warn where a method's
        guarantee needs plain SGD). Default: nothing."""

    @abstractmethod
    def update(self, grad_A: torch.Tensor | None, grad_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scaling: float, state: Any) -> tuple[torch.Tensor | None, torch.Tensor] | Update:
        """The transformed ``(grad_A (r, n) or None if A is frozen, grad_B (m, r))``; a stateful method returns
        ``Update(grad_A, grad_B, next_state)`` and leaves ``state`` as it is (the optimizer keeps the next state
        only once the step is accepted)."""

    def update_many(self, layers: list[LayerGrads]) -> list[tuple[torch.Tensor | None, torch.Tensor] | Update]:
        """``update`` for every adapted layer at once; override to batch the small ``r x r`` algebra
        across layers (see ``lowrank.optim.linalg.grouped``)."""
        return [self.update(*layer) for layer in layers]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class BatchedPreconditioner(Preconditioner):
    """A preconditioner that does its work across all layers at once: implement ``update_many``;
    ``update`` (one layer) is derived from it."""

    def update(self, grad_A, grad_B, A, B, scaling, state):
        return self.update_many([LayerGrads(grad_A, grad_B, A, B, scaling, state)])[0]

    @abstractmethod
    def update_many(self, layers: list[LayerGrads]) -> list[tuple[torch.Tensor | None, torch.Tensor] | Update]:
        """The transformed ``(grad_A, grad_B)`` (or ``Update``) of every layer, in order."""
