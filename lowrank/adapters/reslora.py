"""ResLoRA: identity residual mapping in low-rank adaptation (Shi et al. 2024, arXiv 2402.18039); the authors'
code ``microsoft/LMOps`` (``reslora/myloralib/layers.py``: ``ResLoraLinear.forward``, ``calculate_froc``).

Each adapted layer ``n`` is linked to the layer of the same name in the previous block (``model.layers.6.q_proj``
-> ``model.layers.5.q_proj``; only when their shapes match, else it starts a chain of its own), and during
training its LoRA branch takes a shortcut from there (``s`` LoRA's scale, ``d`` dropout)::

    input  (res_is):  h_n = W x_n + s B_n A_n d(x_n + x_{n-1})                    x_{-1} = x_n at the chain start
    block  (res_bs):  h_n = W x_n + s sum_{k=0..m} B_{n-k} A_{n-k} d(x_n)           m = pre_num previous blocks
    middle (res_ms):  h_n = W x_n + s B_n (A_n d(x_n) + sum_{k=1..m} A_{n-k} d(x_{n-k}))

``x_{n-k}`` is the previous layers' input in the same forward (kept, not detached: the gradient reaches them, the
point of the method). For inference the shortcut is merged away (``merge``, ``delta_weight``): exactly for
``block`` (``W_n + s sum_k B_{n-k} A_{n-k}``), approximately for the other two, from ``x_{n-k} ~ c x_n`` with ``c``
the ratio of the mean input norms ``||x||_F`` over the last ``norm_window`` (100) training forwards:

    input:   dW_n = (1 + a_n) s B_n A_n,  a_n = mean||x_{n-1}|| / mean||x_n||  (1 at the chain start)
    middle:  dW_n = s B_n (A_n + sum_k (mean||x_{n-k}|| / mean||x_n||) A_{n-k})

(the authors' input-norm merges; their weight-norm merge of the input variant changes the frozen weight in place
and is not implemented). ``A`` kaiming-uniform, ``B = 0`` (the ``kaiming`` initializer), so the output is
unchanged at step 0. Defaults: ``variant="middle"``, ``pre_num=4`` (the authors' GLUE runs). The norm statistics
are saved with the adapter, so a loaded model merges the same way; the exact training path needs the whole
model (cross-layer inputs), and a layer used alone (outside its model's forward) sees no shortcut.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_adapter
from .lora import LoRALayer

VARIANTS = ("input", "block", "middle")


def _previous_name(name: str) -> str | None:
    """The same layer in the previous block: the last numeric component of ``name`` minus one."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)]
    if not idx or int(parts[idx[-1]]) == 0:
        return None
    parts[idx[-1]] = str(int(parts[idx[-1]]) - 1)
    return ".".join(parts)


@register_adapter("reslora")
class ResLoRALayer(LoRALayer):
    """ResLoRA (arXiv 2402.18039): LoRA with a residual path from the previous block's LoRA; merged for inference."""

    kind = "reslora"

    @dataclass(frozen=True)
    class Options:
        variant: str = "middle"
        """``input`` (res_is), ``block`` (res_bs) or ``middle`` (res_ms) shortcut."""
        pre_num: int = 4
        """``block`` / ``middle``: the previous blocks the shortcut reaches (the authors' GLUE runs: 4)."""
        norm_window: int = 100
        """Training forwards over which the input norms of the merge are averaged (the authors' 100)."""

        def __post_init__(self):
            if self.variant not in VARIANTS:
                raise ValueError(f"invalid variant={self.variant!r}: one of {VARIANTS}")
            for key in ("pre_num", "norm_window"):
                v = getattr(self, key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"invalid {key}={v!r}: a positive integer")

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 options: Any = None):
        super().__init__(base_layer, rank, alpha, scaling, dropout, options)
        self.__dict__["previous"] = None  # not a submodule: the previous block's layer (set by connect)
        self._x: torch.Tensor | None = None  # this forward's (dropped-out) input, for the next block
        self._xa: torch.Tensor | None = None  # this forward's A d(x), for the next blocks (middle)
        self._norms: deque = deque(maxlen=self.options.norm_window)

    @classmethod
    def connect(cls, layers: dict[str, Any]) -> None:
        for name, layer in layers.items():
            prev = layers.get(_previous_name(name) or "")
            ok = isinstance(prev, ResLoRALayer) and (prev.d_out, prev.d_in, prev.rank) == (layer.d_out, layer.d_in,
                                                                                         layer.rank)
            layer.__dict__["previous"] = prev if ok else None

    def chain(self) -> list["ResLoRALayer"]:
        """The previous layers the shortcut reaches, nearest first (``input``: one)."""
        out, prev = [], self.previous
        reach = 1 if self.options.variant == "input" else self.options.pre_num
        while prev is not None and len(out) < reach:
            out.append(prev)
            prev = prev.previous
        return out

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        v = self.options.variant
        xin = x.to(self.A.dtype)
        if self.training:
            self._norms.append(float(xin.detach().norm()))
        prev = self.chain()
        if v == "input":
            p = prev[0]._x if prev and prev[0]._x is not None and prev[0]._x.shape == xin.shape else xin
            self._x = xin
            h = F.linear(self.dropout(xin + p), self.A)
            delta = F.linear(h, self.B)
        elif v == "block":
            h = self.dropout(xin)
            delta = F.linear(F.linear(h, self.A), self.B)
            for q in prev:
                delta = delta + F.linear(F.linear(h, q.A), q.B)
        else:  # middle
            xa = F.linear(self.dropout(xin), self.A)
            self._xa = xa
            total = xa
            for q in prev:
                if q._xa is not None and q._xa.shape == xa.shape:
                    total = total + q._xa
            delta = F.linear(total, self.B)
        return y + (delta * self.scaling).to(y.dtype)

    # -- the merge ----------------------------------------------------------------------------------
    def mean_norm(self) -> float:
        """Mean ``||x||_F`` of this layer's input over the last ``norm_window`` training forwards (0: none yet)."""
        return sum(self._norms) / len(self._norms) if self._norms else 0.0

    def _ratio(self, other: "ResLoRALayer") -> float:
        mine = self.mean_norm()
        return other.mean_norm() / mine if mine > 0 and other.mean_norm() > 0 else 1.0

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The shortcut merged into this layer's update (module docstring): exact for ``block``, the input-norm
        approximation for ``input`` and ``middle``."""
        dt = dtype or self.A.dtype
        s, A, B, prev, v = self.scaling, self.A.to(dt), self.B.to(dt), self.chain(), self.options.variant
        if v == "block":
            return s * (B @ A + sum((q.B.to(dt) @ q.A.to(dt) for q in prev), torch.zeros_like(B @ A)))
        if v == "input":
            a = self._ratio(prev[0]) if prev else 1.0
            return (1.0 + a) * s * (B @ A)
        return s * B @ (A + sum((self._ratio(q) * q.A.to(dt) for q in prev), torch.zeros_like(A)))

    @property
    def merge_exact(self) -> bool:
        return self.options.variant == "block"

    def factors(self):
        return None  # the update depends on other layers' factors: not the s B A a preconditioner assumes

    # -- saved state: the norm statistics of the merge ------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "input_norm": torch.tensor([self.mean_norm()], dtype=self.A.dtype)}

    @classmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(info), "input_norm": (1,)}

    @classmethod
    def init_result(cls, tensors: dict[str, torch.Tensor]):
        return super().init_result({k: v for k, v in tensors.items() if k != "input_norm"})

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self._norms.clear()
        value = float(tensors["input_norm"][0])
        if value > 0:
            self._norms.append(value)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", reslora={self.options.variant}, pre_num={self.options.pre_num}"
