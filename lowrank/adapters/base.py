"""``Adapter``: the abstract layer that wraps a frozen base module and adds a trainable update.

An adapter knows its factors and how to apply them; it knows nothing about how they were
initialized (that is an :class:`lowrank.Initializer`'s job) or how they are optimized (a
:class:`lowrank.Preconditioner`'s). Weights are always reasoned about as ``(d_out, d_in)``,
whatever the base module's storage layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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
    """A trainable update around a frozen base layer: ``y = base(x) + update(x)``."""

    base_layer: nn.Module

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this adapter can wrap ``module``."""
        return isinstance(module, SUPPORTED_TYPES)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as ``(d_out, d_in)`` (a view; whatever the storage layout)."""
        return weight_view(self.base_layer)

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight, as ``(d_out, d_in)``."""

    @abstractmethod
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own trainable parameters, by attribute name."""

    @abstractmethod
    def merge(self) -> None:
        """Fold the update into the base weight (forward then skips the adapter path)."""

    @abstractmethod
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
