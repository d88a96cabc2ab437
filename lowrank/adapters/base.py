"""``Adapter``: the abstract layer that wraps a frozen base module and adds a trainable update.

An adapter knows its factors and how to apply them; it knows nothing about how they were
initialized (that is an :class:`lowrank.Initializer`'s job) or how they are optimized (a
:class:`lowrank.Preconditioner`'s). Weights are always reasoned about as ``(d_out, d_in)``,
whatever the base module's storage layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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

    The abstract members below are everything a new adapter writes (in its own file, registered with
    ``@lowrank.register_adapter("name")``); inject, merge/unmerge/unload, save/load, the optimizer, theory
    and ``lowrank.peft`` then work with it unchanged:

    - ``__init__(base_layer, rank, alpha, scaling, dropout=0.0, options=None)`` calling
      ``super().__init__(options)``; attributes ``base_layer``, ``rank``, ``alpha``, ``scaling``, ``d_out``,
      ``d_in``; ``Options``, a frozen dataclass of the adapter's own options (``LoRAConfig.adapter_options``).
    - ``forward(x)``; ``delta_weight(dtype=None)``, the update as ``(d_out, d_in)``.
    - ``adapter_parameters()``: the trainable parameters; ``factors()``: the ``(A, B)`` pair a preconditioner
      acts on, or ``None`` when the adapter does not train such a pair.
    - tensor I/O: ``initialize(result)`` (set from an initializer's :class:`lowrank.InitResult`), ``tensors()``,
      ``tensor_shapes(info)``, ``init_result(tensors)``, ``load_tensors(tensors)``.

    The base weight's offset ``W = W0 - s B0 A0`` (its record ``A0``, ``B0``, the original weight, its rebuild)
    is :mod:`lowrank.weights`' business, not the adapter's; :meth:`merge` / :meth:`unmerge` add and subtract
    :meth:`delta_weight` (an adapter whose merged weight is not ``W + delta``, such as DoRA, overrides
    :meth:`merged_weight` / :meth:`unmerged_weight`).
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

    @dataclass(frozen=True)
    class Options:
        """The adapter's options (``LoRAConfig.adapter_options``, checked like ``init_options``); none by default.
        An adapter with options declares its own frozen dataclass here and reads ``self.options``."""

    def __init__(self, options: Any = None):
        super().__init__()
        self.options = options if options is not None else self.Options()
        # The initial factors when the base was offset (W = W0 - s B0 A0; set by lowrank.weights.apply_offset),
        # None while W == W0.
        self.register_buffer("A0", None, persistent=False)
        self.register_buffer("B0", None, persistent=False)
        self.merged = False

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this adapter can wrap ``module``."""
        return isinstance(module, SUPPORTED_TYPES)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as ``(d_out, d_in)`` (a view; whatever the storage layout)."""
        return weight_view(self.base_layer)

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32, or float64 for float64 weights: the precision of offsets and merges."""
        return torch.promote_types(self.base_layer.weight.dtype, torch.float32)

    @property
    def offset(self) -> bool:
        """Whether the base weight was offset at initialization (``W = W0 - s B0 A0``)."""
        return self.A0 is not None

    @abstractmethod
    def initialize(self, result: Any) -> torch.Tensor | None:
        """Set the adapter from an initializer's result (with ``result.offset`` the base is offset through
        :func:`lowrank.weights.apply_offset`); return the replaced base weight data (``None``: unchanged)."""

    @abstractmethod
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The update this adapter adds to the base weight, ``(d_out, d_in)``, computed in ``dtype`` (default:
        the adapter's own)."""

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

    def merged_weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The base weight after :meth:`merge` from the one before, ``w + delta_weight()`` (in ``dtype``)."""
        return w + self.delta_weight(dtype)

    def unmerged_weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The inverse of :meth:`merged_weight`, ``w - delta_weight()``."""
        return w - self.delta_weight(dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (:meth:`merged_weight` in :attr:`compute_dtype`; forward then skips
        the adapter path)."""
        if self.merged:
            raise RuntimeError("layer is already merged; call unmerge() first")
        dt = self.compute_dtype
        set_weight(self.base_layer, self.merged_weight(self.base_weight().to(dt), dt))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        dt = self.compute_dtype
        set_weight(self.base_layer, self.unmerged_weight(self.base_weight().to(dt), dt))
        self.merged = False
