"""``Adapter``: the abstract layer that wraps a frozen base module and adds a trainable update.

An adapter knows its factors and how to apply them; it knows nothing about how they were
initialized (that is an :class:`lowrank.Initializer`'s job) or how they are optimized (a
:class:`lowrank.Preconditioner`'s). Weights are always reasoned about as ``(d_out, d_in)``,
whatever the base module's storage layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..quant import dequantized_linear, is_4bit
from ..weights import (SUPPORTED_TYPES, Conv1D, is_conv1d, restore_weight, set_weight, weight_dtype,  # noqa: F401
                       weight_shape, weight_view)

@dataclass
class InitResult:
    """What an adapter is set from, for one layer (``Adapter.initialize``): what an initializer returns, and what
    a saved file's tensors become (``Adapter.init_result``)."""

    A: torch.Tensor
    """``(r, d_in)``."""
    B: torch.Tensor
    """``(d_out, r)``."""
    offset: bool = False
    """Set the base weight to ``W0 - s B A`` so the output is unchanged at step 0."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further tensors for adapters that have them (LoRA-XS's core ``R (r, r)``)."""
    offset_factors: tuple[torch.Tensor, torch.Tensor] | None = None
    """With ``offset``: the ``(A0, B0)`` the base is offset by, ``W = W0 - s B0 A0``, when they are not ``(A, B)``
    (LoftQ: the base is prepared for quantization while the adapter starts elsewhere; the output then moves by
    ``s (B A - B0 A0)``). ``None``: ``(A, B)``, the output is unchanged."""

    def subtracted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A0, B0)`` of the offset: :attr:`offset_factors`, or ``(A, B)``."""
        return self.offset_factors if self.offset_factors is not None else (self.A, self.B)


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
    ``"latent"`` (frozen ``A``, ``B`` and a trainable ``r x r`` core: LoRA-XS), ``"blockwise"`` (GraLoRA: packed
    trainable ``A``, ``B`` paired block by block) or ``"random_basis"`` (RandLoRA: frozen shared random bases,
    trainable scalings) or ``"kasa"`` (KaSA: ``B diag(d) A`` with a trainable diagonal). An adapter PEFT holds as a
    tuner of its own has a format in :mod:`lowrank.peft.formats`. Initializers and preconditioners list the kinds
    they support (``adapter_kinds``)."""

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
    def check_layer(cls, name: str, module: nn.Module, rank: int, options: Any) -> None:
        """Raise ``ValueError`` naming the layer, the value and the fix when the adapter's options do not fit
        ``module`` (``plan`` calls it for every target before anything changes; GraLoRA's ``k`` must divide the
        dimensions); default: nothing to check."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this adapter can wrap ``module``."""
        return isinstance(module, SUPPORTED_TYPES)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as ``(d_out, d_in)`` (a view; whatever the storage layout)."""
        return weight_view(self.base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's own weight parameter, as it stores it (PEFT's layers expose the same): model code
        that reads a wrapped layer's ``.weight`` keeps working — T5's feed-forward checks ``self.wo.weight.dtype``
        in every forward. Not the adapted weight: that is ``base_weight() + delta_weight()`` (:meth:`merge`)."""
        return self.base_layer.weight

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32, or float64 for float64 weights: the precision of offsets and merges."""
        return torch.promote_types(weight_dtype(self.base_layer), torch.float32)

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

    @property
    def merge_exact(self) -> bool:
        """Whether :meth:`merge` reproduces the layer's training-time output (ResLoRA's input and middle shortcuts
        are merged by an approximation: ``False``)."""
        return True

    auxiliary_loss: ClassVar[Any] = None
    """``model -> scalar``: a term the adapter's method adds to the task loss (KaSA's, LoRA²'s regularizers), or
    ``None``; the ablation runner adds it for arms of this adapter."""

    @classmethod
    def training_hook(cls, model: nn.Module, total_steps: int) -> Any:
        """An object whose ``step()`` runs after every optimizer step of a run of ``total_steps`` steps (LoRA²'s
        pruning), or ``None`` (the default); the ablation runner calls it."""
        return None

    @classmethod
    def connect(cls, layers: dict[str, "Adapter"]) -> None:
        """Called once the model's adapter layers are in place (``{dotted name: layer}``, in model order), for an
        adapter whose layers refer to each other (ResLoRA's shortcut to the previous block); default nothing."""

    def layer_info(self) -> dict[str, Any]:
        """Fields the saved layer record carries beside rank, shape and scale, for :meth:`tensor_shapes` (e.g.
        LoRA²'s inner rank ``k``); default none."""
        return {}

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
        the adapter path). A 4-bit base is replaced by a float ``nn.Linear`` holding the merged weight (a
        dequantized copy: exact, where re-quantizing would round); :meth:`unmerge` puts the 4-bit layer back."""
        if self.merged:
            raise RuntimeError("layer is already merged; call unmerge() first")
        dt = self.compute_dtype
        if is_4bit(self.base_layer):
            self.__dict__["quantized_base"] = self.base_layer  # not a submodule: not saved, not trained
            self.base_layer = dequantized_linear(self.base_layer, self.merged_weight(self.base_weight().to(dt), dt))
        else:
            set_weight(self.base_layer, self.merged_weight(self.base_weight().to(dt), dt))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        quantized = self.__dict__.pop("quantized_base", None)
        if quantized is not None:
            self.base_layer = quantized
        else:
            dt = self.compute_dtype
            set_weight(self.base_layer, self.unmerged_weight(self.base_weight().to(dt), dt))
        self.merged = False
