"""The LoRA layer (Hu et al. 2021, arXiv 2106.09685).

    y = W x + b + s * B A dropout(x),   A: (r, d_in), B: (d_out, r)

with ``s = alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA). Wraps ``nn.Linear`` and Hugging Face
``Conv1D`` alike. When an initializer starts from ``B0 A0 != 0`` the framework offsets the base,
``W = W0 - s B0 A0`` (:func:`lowrank.weights.apply_offset`), recording ``A0``, ``B0`` on the layer so the
original ``W0`` can be restored and a saved adapter can rebuild the fine-tuned model from the original base.

In training with dropout, and at ranks where forming ``B A`` is cheaper, the product goes through
:func:`lowrank.adapters.product.lora_product`: the same mathematics, without a dropped copy of ``x`` kept for
backward, in the order of products that costs least for the layer's shapes (that module's docstring gives the
counts). Without dropout at the usual ranks it is the two ``F.linear`` calls below, as PEFT computes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_adapter
from ..weights import apply_offset, original_weight, rebuild_offset, weight_dtype, weight_shape
from .base import Adapter
from .product import choose_order, lora_product


@register_adapter("lora")
class LoRALayer(Adapter):
    """Low-rank update ``s * B @ A`` around a frozen ``nn.Linear`` / ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 options: Any = None):
        super().__init__(options)  # the options, and the offset record A0, B0 (None: W == W0) and merged = False
        if not self.supports(base_layer):
            raise TypeError(f"LoRALayer cannot wrap {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.d_out, self.d_in = weight_shape(base_layer)
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(scaling)
        w = base_layer.weight
        dt = weight_dtype(base_layer)  # a 4-bit layer's packed weight is uint8
        self.A = nn.Parameter(torch.zeros(self.rank, self.d_in, dtype=dt, device=w.device))  # (r, n)
        self.B = nn.Parameter(torch.zeros(self.d_out, self.rank, dtype=dt, device=w.device))  # (m, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def p(self) -> float:
        """The dropout rate on the adapter's input (``self.dropout``'s)."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = x.to(self.A.dtype)
        p = self.p if self.training else 0.0
        if p == 0 and choose_order(h.numel() // self.d_in, self.d_in, self.d_out, self.rank) == "factored":
            return y + (F.linear(F.linear(h, self.A), self.B) * self.scaling).to(y.dtype)  # (..., r) -> (..., m)
        return y + lora_product(h, self.A, self.B, self.scaling, p).to(y.dtype)

    # -- weights --------------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s * B @ A`` as ``(d_out, d_in)``, in ``dtype`` (default the factors')."""
        dt = dtype or self.A.dtype
        return self.scaling * (self.B.to(dt) @ self.A.to(dt))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B}

    def factors(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        return self.A, self.B

    # -- initialization and saved state -----------------------------------------------------------
    @torch.no_grad()
    def initialize(self, result) -> torch.Tensor | None:
        """``A``, ``B`` from ``result``; with ``result.offset`` also ``W = W0 - s B0 A0`` (``(A0, B0)``:
        ``result.subtracted()``, usually ``(A, B)``; returns the old data)."""
        self.set_factors(result.A, result.B)
        if not result.offset:
            return None
        if result.offset_factors is None:
            return apply_offset(self)
        A0, B0 = result.offset_factors
        return apply_offset(self, (A0.to(self.A), B0.to(self.B)))

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy ``A (r, d_in)`` and ``B (d_out, r)`` into the parameters (cast to their dtype)."""
        self.A.copy_(A)
        self.B.copy_(B)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"A": self.A.detach(), "B": self.B.detach()}
        if self.offset:
            out.update(A0=self.A0, B0=self.B0)
        return out

    @classmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """``offset_rank`` (saved when it is not ``rank``): the rank of the offset record ``A0``, ``B0``, which a chain
        grows by each link it folds into the base (``lowrank.chains``)."""
        A, B = (info["rank"], info["d_in"]), (info["d_out"], info["rank"])
        r0 = info.get("offset_rank", info["rank"])
        return {"A": A, "B": B, **({"A0": (r0, info["d_in"]), "B0": (info["d_out"], r0)} if info["offset"] else {})}

    @classmethod
    def init_result(cls, tensors: dict[str, torch.Tensor]):
        from .base import InitResult

        offset = "A0" in tensors
        if offset and tensors["A0"].shape != tensors["A"].shape:  # a chain's record: the base offset by A0, B0
            return InitResult(A=tensors["A"], B=tensors["B"], offset=True,
                              offset_factors=(tensors["A0"], tensors["B0"]))
        return InitResult(A=tensors["A0" if offset else "A"], B=tensors["B0" if offset else "B"], offset=offset)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Trained ``A``, ``B``; if the saved initial factors differ from this layer's, the offset base
        is rebuilt from them (so a resumed model matches the saved one bit for bit)."""
        if self.offset and not (torch.equal(tensors["A0"], self.A0.cpu()) and torch.equal(tensors["B0"], self.B0.cpu())):
            w0 = original_weight(self)
            self.A0, self.B0 = tensors["A0"].to(self.A0), tensors["B0"].to(self.B0)
            rebuild_offset(self, w0)
        self.set_factors(tensors["A"], tensors["B"])

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:.4g}, offset={self.offset}, merged={self.merged}")
