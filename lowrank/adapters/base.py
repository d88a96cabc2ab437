"""``Adapter``: the abstract layer that wraps a frozen base module and adds a trainable update.

An adapter knows its factors and how to apply them; it knows nothing about how they were
initialized (that is an :class:`lowrank.Initializer`'s job) or how they are optimized (a
:class:`lowrank.Preconditioner`'s). Weights are always reasoned about as ``(d_out, d_in)``,
whatever the base module's storage layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

try:  # transformers is a dependency, but keep the layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

SUPPORTED_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2) stores its weight as ``(d_in, d_out)``."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported base module."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


def weight_view(module: nn.Module) -> torch.Tensor:
    """The base weight as a ``(d_out, d_in)`` view (no copy)."""
    w = module.weight
    return w.T if is_conv1d(module) else w


def set_weight(module: nn.Module, w_mn: torch.Tensor) -> torch.Tensor:
    """Store ``w_mn`` (``(d_out, d_in)``) as the module's weight data, in its dtype and layout.

    Returns the previous data tensor, so a caller can put it back bit for bit.
    """
    old = module.weight.data
    new = w_mn.T if is_conv1d(module) else w_mn
    module.weight.data = new.to(dtype=old.dtype, device=old.device).contiguous()
    return old


class Adapter(nn.Module, ABC):
    """A trainable update around a frozen base layer: ``y = base(x) + update(x)``.

    The protocol below is everything the framework uses; a new adapter implements it in its own
    file and registers itself (``@lowrank.register_adapter("name")``), and inject, merge/unmerge/
    unload, save/load, the optimizer, theory and ``lowrank.peft`` work with it unchanged.

    - ``__init__(base_layer, rank, alpha, scaling, dropout)``; attributes ``base_layer``, ``rank``,
      ``alpha``, ``scaling``, ``d_out``, ``d_in``, ``merged``.
    - ``initialize(result)``: take an initializer's :class:`lowrank.InitResult` (factors, offset,
      extras) and return the base weight data it replaced (for rollback) or ``None``.
    - ``adapter_parameters()``: the trainable parameters; ``factors()``: the ``(A, B)`` pair a
      preconditioner acts on, or ``None`` when the adapter does not train such a pair.
    - ``tensors()``, ``tensor_shapes(info)``, ``load_tensors(...)``: what a saved adapter holds.
    - ``delta_weight()``, ``merge()``, ``unmerge()``, ``offset``, ``original_weight()``.
    """

    base_layer: nn.Module
    rank: int
    alpha: float
    scaling: float
    d_out: int
    d_in: int
    merged: bool
    registry_name: ClassVar[str] = "?"
    kind: ClassVar[str] = "factors"
    """What plug-ins it pairs with: ``"factors"`` (trainable ``A``, ``B`` around the base: LoRA, DoRA) or
    ``"latent"`` (frozen ``A``, ``B`` and a trainable ``r x r`` core: LoRA-XS). Initializers and
    preconditioners list the kinds they support (``adapter_kinds``)."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this adapter can wrap ``module``."""
        return isinstance(module, SUPPORTED_TYPES)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as ``(d_out, d_in)`` (a view; whatever the storage layout)."""
        return weight_view(self.base_layer)

    @abstractmethod
    def initialize(self, result: Any) -> torch.Tensor | None:
        """Set the adapter from an initializer's result; offset the base if it asks; return the replaced
        base weight data (``None`` if the base was not changed)."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight, as ``(d_out, d_in)``."""

    @abstractmethod
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own trainable parameters, by attribute name."""

    def factors(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """``(A (r, d_in), B (d_out, r))`` trained as a pair (what preconditioners transform), or ``None``."""
        return None

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a saved adapter holds for this layer (trained state and what rebuilds the base)."""

    @classmethod
    @abstractmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Expected shapes of :meth:`tensors` from a saved layer's info (``rank``, ``d_out``, ``d_in``, ``offset``)."""

    @classmethod
    @abstractmethod
    def init_result(cls, tensors: dict[str, torch.Tensor]) -> Any:
        """The :class:`lowrank.InitResult` that rebuilds, on the original base, the layer these saved tensors
        came from as it was at initialization (its offset included)."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved trained state (shapes already checked) into the adapter."""

    @property
    @abstractmethod
    def offset(self) -> bool:
        """Whether the base weight was changed at initialization (``original_weight`` undoes it)."""

    @abstractmethod
    def original_weight(self) -> torch.Tensor:
        """The pretrained weight before initialization, ``(d_out, d_in)`` in the compute dtype."""

    @abstractmethod
    def merge(self) -> None:
        """Fold the update into the base weight (forward then skips the adapter path)."""

    @abstractmethod
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
