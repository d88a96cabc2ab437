"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

    W' = m * (W + s B A) / ||W + s B A||_row          m: (d_out,), the norm per output unit (over d_in)

The norm is treated as a constant in the backward pass (the paper's Sec. 4.3: it is detached), and
``m`` is initialized to the norm of the initial weight, so the output is unchanged at step 0. The
forward pass is computed without forming ``W'``, as PEFT does, so the two agree to rounding::

    y = base(x) + (m / n - 1) * (W x) + (m / n) * s B A x,      n = ||W + s B A||_row (detached)

(with dropout active in training, the two adapter terms see the dropped input; the bias is never
rescaled). ``W`` is the frozen base weight: for initializers that offset it (LoRA-GA, PiSSA, ...)
``W = W0 - s B0 A0``, and ``m`` starts at ``||W + s B0 A0|| = ||W0||``. Every factor initializer
works with it: it sets ``A``, ``B`` and the offset, then ``m``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_adapter
from ..weights import weight_dtype
from .lora import LoRALayer


@register_adapter("dora")
class DoRALayer(LoRALayer):
    """DoRA (arXiv 2402.09353): magnitude ``m`` times the direction ``(W + s B A) / ||W + s B A||_row``."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 options: Any = None):
        super().__init__(base_layer, rank, alpha, scaling, dropout, options)
        w = base_layer.weight
        dt = weight_dtype(base_layer)  # a 4-bit layer's packed weight is uint8
        self.m = nn.Parameter(torch.ones(self.d_out, dtype=dt, device=w.device))  # (d_out,)
        self.register_buffer("merge_norm", None, persistent=False)  # the norm used by merge(), for unmerge()

    def weight_norm(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``||W + s B A||`` per output unit, detached, in ``dtype`` (default the adapter's), ``(d_out,)``."""
        dtype = dtype or self.A.dtype
        with torch.no_grad():
            w = self.base_weight().to(dtype) + self.scaling * (self.B.to(dtype) @ self.A.to(dtype))
            return torch.linalg.vector_norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        x = x.to(self.A.dtype)
        h = self.dropout(x)
        lora = F.linear(F.linear(h, self.A), self.B) * self.scaling  # (..., d_out)
        scale = self.m / self.weight_norm(x.dtype)  # the norm carries no gradient (Sec. 4.3)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base = y.to(x.dtype) - bias.to(x.dtype) if bias is not None else y.to(x.dtype)
        else:
            base = F.linear(h, self.base_weight().to(x.dtype))
        return y + ((scale - 1) * base + scale * lora).to(y.dtype)

    # -- weights --------------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W' - W`` as ``(d_out, d_in)`` in ``dtype`` (default float32/64) (differentiable in ``A``, ``B``,
        ``m``; the norm is a constant)."""
        dt = dtype or self.compute_dtype
        w = self.base_weight().to(dt)
        direction = w + self.scaling * (self.B.to(dt) @ self.A.to(dt))
        return (self.m.to(dt) / self.weight_norm(dt))[:, None] * direction - w

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B, "m": self.m}

    @torch.no_grad()
    def initialize(self, result) -> torch.Tensor | None:
        """``A``, ``B`` and the offset as LoRA, then ``m = ||W + s B A||_row`` (the output is unchanged)."""
        old = super().initialize(result)
        self.m.copy_(self.weight_norm(self.compute_dtype))
        return old

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "m": self.m.detach()}

    @classmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(info), "m": (info["d_out"],)}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self.m.copy_(tensors["m"])

    def merged_weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``m * (W + s B A) / ||W + s B A||_row``; the norm is kept for :meth:`unmerged_weight`."""
        self.merge_norm = self.weight_norm(dtype)
        return (self.m.to(dtype) / self.merge_norm)[:, None] * (w + super().delta_weight(dtype))

    def unmerged_weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = w / (self.m.to(dtype) / self.merge_norm)[:, None] - super().delta_weight(dtype)
        self.merge_norm = None
        return w

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
