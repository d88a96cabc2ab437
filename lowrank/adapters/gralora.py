"""GraLoRA: granular low-rank adaptation (Jung et al. 2025, arXiv 2505.20355), with PEFT 0.21's
``peft.tuners.gralora`` as the parity target.

The weight is cut into a ``k x k`` grid of blocks of ``(d_out/k, d_in/k)``; block ``(i, j)`` has its own
LoRA of rank ``r_g / k``, and Hybrid GraLoRA adds a plain LoRA of rank ``h`` over the whole matrix::

    y = W x + b + s (dW_g + B_h A_h) x,    (dW_g)_ij = B_ij A_ij,   A_ij (r_g/k, d_in/k),  B_ij (d_out/k, r_g/k)

``s = alpha / (r_g + h)`` (PEFT's scale): lowrank's ``rank`` is ``r = r_g + h``, so ``s`` is the config's
``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``). The layer trains ``r (d_in + d_out)`` numbers, as a rank-``r``
LoRA does, while ``dW_g`` can reach rank ``k r_g``. Options: ``k`` (PEFT's ``gralora_k``) and ``hybrid_r``
(``h``); ``k`` must divide ``d_in``, ``d_out`` and ``r_g = rank - hybrid_r``.

Storage is LoRA's layout: ``A (r, d_in)``, ``B (d_out, r)``; rows ``< r_g`` of ``A`` and columns ``< r_g`` of
``B`` are GraLoRA's, the rest the hybrid LoRA's. Block ``(i, j)`` uses ``A_ij = A[group i, block j]`` and
``B_ij = B[block i, group j]`` (group ``g``: the ``g``-th run of ``r_g / k`` rows of ``A`` / columns of ``B``;
block: the ``i``-th run of ``d / k`` rows or columns): a LoRA's block ``(i, j)`` is
``sum_g B[block i, group g] A[group g, block j]``, GraLoRA's the one product ``B[block i, group j] A[group i,
block j]``, so the ``k^2`` blocks have factors of their own. PEFT's tensors are the same numbers rearranged:
``gralora_A (k, d_in/k, r_g)`` with ``gralora_A[j, p, c] = A[c, j d_in/k + p]``, ``gralora_B (k, r_g, d_out/k)``
with ``gralora_B[i, c, o] = B[i d_out/k + o, c]``, ``gralora_{A,B}_general.weight`` the hybrid ``A_h``, ``B_h``.

Taken from PEFT's code (the parity target) rather than the paper: the scale above (the rank-``r`` LoRA's
budget, ``r = r_g + h``); dropout is drawn separately for the GraLoRA and the hybrid path (as PEFT does); PEFT's
default init draws every ``A`` block Kaiming-uniform over the block's fan-in ``d_in / k`` (bound
``sqrt(k / d_in)``), while the ``gralora`` initializer draws ``A`` as LoRA's Kaiming (bound ``1 / sqrt(d_in)``,
the hybrid rows' bound in PEFT), since an initializer does not see the adapter's ``k`` (a departure from PEFT's
init, not from its layer); ``B = 0`` in both, so the output is unchanged at step 0. PEFT's forward takes 2-d and
3-d inputs; this one any number of leading dimensions. The base weight is never offset. ``lowrank.peft.export``
writes a PEFT GraLoRA adapter; ``lowrank.peft.load`` reads one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_adapter
from ..weights import weight_dtype, weight_shape
from .base import Adapter


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@register_adapter("gralora")
class GraLoRALayer(Adapter):
    """GraLoRA (arXiv 2505.20355): a k x k grid of block LoRAs (plus an optional hybrid LoRA), as PEFT's."""

    kind = "blockwise"
    default_init: ClassVar[str] = "gralora"  # its initializer (LoRAConfig's default "kaiming" does not fit it)

    @dataclass(frozen=True)
    class Options:
        k: int = 2
        """Blocks per side (PEFT's ``gralora_k``); divides ``d_in``, ``d_out`` and ``rank - hybrid_r``."""
        hybrid_r: int = 0
        """Rank of the plain LoRA beside the blocks (PEFT's ``hybrid_r``), part of ``rank``."""

        def __post_init__(self):
            if self.k < 1:
                raise ValueError(f"invalid k={self.k!r}: must be a positive integer (PEFT's gralora_k; 2 for rank <= 32, "
                                 "4 for rank >= 64 in PEFT's advice)")
            if self.hybrid_r < 0:
                raise ValueError(f"invalid hybrid_r={self.hybrid_r!r}: must be >= 0 (0: no hybrid LoRA)")

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 options: Any = None):
        super().__init__(options)
        if not self.supports(base_layer):
            raise TypeError(f"GraLoRALayer cannot wrap {type(base_layer).__name__}")
        self.check_layer(None, base_layer, rank, self.options)
        self.base_layer = base_layer
        self.d_out, self.d_in = weight_shape(base_layer)
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(scaling)
        self.k, self.hybrid_r = self.options.k, self.options.hybrid_r
        self.block_rank = self.rank - self.hybrid_r  # r_g
        w = base_layer.weight
        dt = weight_dtype(base_layer)
        self.A = nn.Parameter(torch.zeros(self.rank, self.d_in, dtype=dt, device=w.device))  # (r, n)
        self.B = nn.Parameter(torch.zeros(self.d_out, self.rank, dtype=dt, device=w.device))  # (m, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def check_layer(cls, name: str | None, module: nn.Module, rank: int, options: "GraLoRALayer.Options") -> None:
        """Raise ``ValueError`` naming the layer, the value and the fix when ``options`` do not fit it."""
        m, n = weight_shape(module)
        where = f"layer {name!r}" if name else f"a {type(module).__name__} layer of (d_out, d_in) = {(m, n)}"
        k, h = options.k, options.hybrid_r
        r_g = rank - h
        if r_g < 1 or r_g % k:
            fits = [r for r in range(h + k, h + 4 * k + 1, k)]
            raise ValueError(f"{where} (gralora): rank {rank} - hybrid_r {h} = {r_g} is not a positive multiple of "
                             f"k={k}; use a rank with rank - hybrid_r divisible by k (e.g. rank in {fits}) or another k")
        for dim, size in (("d_in", n), ("d_out", m)):
            if size % k:
                common = [d for d in _divisors(m) if n % d == 0 and r_g % d == 0]
                raise ValueError(f"{where} (gralora): k={k} does not divide {dim}={size}; use a k that divides d_out={m}, "
                                 f"d_in={n} and rank - hybrid_r = {r_g} (here k in {common}), or leave this layer out "
                                 "of targets")

    # -- forward ----------------------------------------------------------------------------------
    def _block_views(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` as ``(i, s, j, p)`` and ``B`` as ``(i, o, j, s)``: block ``(i, j)`` is ``B[i, :, j] @ A[i, :, j]``."""
        k, r_g = self.k, self.block_rank
        A = self.A[:r_g].to(dtype).reshape(k, r_g // k, k, self.d_in // k)
        B = self.B[:, :r_g].to(dtype).reshape(k, self.d_out // k, k, r_g // k)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        dt = self.A.dtype
        h = self.dropout(x).to(dt)
        A, B = self._block_views(dt)
        z = torch.einsum("...jp,isjp->...ijs", h.reshape(*h.shape[:-1], self.k, self.d_in // self.k), A)
        out = torch.einsum("...ijs,iojs->...io", z, B).reshape(*h.shape[:-1], self.d_out)
        if self.hybrid_r:  # PEFT draws the hybrid path's dropout mask separately
            r_g = self.block_rank
            out = out + F.linear(F.linear(self.dropout(x).to(dt), self.A[r_g:]), self.B[:, r_g:])
        return y + (out * self.scaling).to(y.dtype)

    # -- weights --------------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s (dW_g + B_h A_h)`` as ``(d_out, d_in)``, in ``dtype`` (default the factors')."""
        dt = dtype or self.A.dtype
        A, B = self._block_views(dt)
        dw = torch.einsum("iojs,isjp->iojp", B, A).reshape(self.d_out, self.d_in)
        if self.hybrid_r:
            dw = dw + self.B[:, self.block_rank:].to(dt) @ self.A[self.block_rank:].to(dt)
        return self.scaling * dw

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B}

    # -- initialization and saved state -----------------------------------------------------------
    @torch.no_grad()
    def initialize(self, result) -> torch.Tensor | None:
        if result.offset:
            raise ValueError("the gralora adapter does not offset the base weight; its initializer asked for it")
        self.A.copy_(result.A)
        self.B.copy_(result.B)
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A.detach(), "B": self.B.detach()}

    @classmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {"A": (info["rank"], info["d_in"]), "B": (info["d_out"], info["rank"])}

    @classmethod
    def init_result(cls, tensors: dict[str, torch.Tensor]):
        from .base import InitResult

        return InitResult(A=tensors["A"], B=tensors["B"])

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.A.copy_(tensors["A"])
        self.B.copy_(tensors["B"])

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank} (blocks {self.k}x{self.k} of rank "
                f"{self.block_rank // self.k}, hybrid {self.hybrid_r}), alpha={self.alpha:g}, scaling={self.scaling:.4g}, "
                f"merged={self.merged}")

