"""LoRA-XS: a trainable ``r x r`` core between frozen low-rank factors (Bałazy et al. 2024, arXiv 2405.17604).

    y = W x + b + s * B R A dropout(x),   A: (r, d_in) and B: (d_out, r) frozen, R: (r, r) trained

so a layer trains exactly ``r^2`` numbers. ``A`` and ``B`` come from an initializer of kind
``"latent"`` (``lora_xs``: the top-``r`` SVD of ``W0``; ``lora_sb``: the SVD of an estimated first
update) and are kept as buffers: they are saved and moved with the model, never trained. The
base weight is not offset. PEFT has no such adapter: ``lowrank.peft.export`` refuses it, and
``save_adapter`` / ``load_adapter``, merge and unload work as for LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_adapter
from ..weights import weight_dtype, weight_shape
from .base import Adapter


@register_adapter("lora_xs")
class LoRAXSLayer(Adapter):
    """LoRA-XS (arXiv 2405.17604): ``s B R A`` with frozen ``A``, ``B`` and a trainable ``R (r, r)``."""

    kind = "latent"

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 options: Any = None):
        super().__init__(options)
        if not self.supports(base_layer):
            raise TypeError(f"LoRAXSLayer cannot wrap {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.d_out, self.d_in = weight_shape(base_layer)
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(scaling)
        w = base_layer.weight
        dt = weight_dtype(base_layer)  # a 4-bit layer's packed weight is uint8
        self.register_buffer("A", torch.zeros(self.rank, self.d_in, dtype=dt, device=w.device))  # (r, n) frozen
        self.register_buffer("B", torch.zeros(self.d_out, self.rank, dtype=dt, device=w.device))  # (m, r) frozen
        self.R = nn.Parameter(torch.zeros(self.rank, self.rank, dtype=dt, device=w.device))  # (r, r) trained
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x).to(self.R.dtype), self.A)  # (..., r)
        return y + (F.linear(F.linear(h, self.R), self.B) * self.scaling).to(y.dtype)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s * B @ R @ A`` as ``(d_out, d_in)``, in ``dtype`` (default the core's)."""
        dt = dtype or self.R.dtype
        return self.scaling * (self.B.to(dt) @ self.R.to(dt) @ self.A.to(dt))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"R": self.R}

    @torch.no_grad()
    def initialize(self, result) -> torch.Tensor | None:
        if result.offset:
            raise ValueError("the lora_xs adapter does not offset the base weight; its initializer asked for it")
        self.A.copy_(result.A)
        self.B.copy_(result.B)
        self.R.copy_(result.extras.get("R", torch.zeros(self.rank, self.rank)))
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A, "B": self.B, "R": self.R.detach()}

    @classmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        r = info["rank"]
        return {"A": (r, info["d_in"]), "B": (info["d_out"], r), "R": (r, r)}

    @classmethod
    def init_result(cls, tensors: dict[str, torch.Tensor]):
        from .base import InitResult

        return InitResult(A=tensors["A"], B=tensors["B"], extras={"R": tensors["R"]})

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.A.copy_(tensors["A"])
        self.B.copy_(tensors["B"])
        self.R.copy_(tensors["R"])

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:.4g}, trainable=R ({self.rank}x{self.rank}), merged={self.merged}")
