"""RandLoRA: full-rank updates from shared random bases with trained diagonal scalings (Albert et al. 2025,
arXiv 2502.00987), with PEFT 0.21's ``peft.tuners.randlora`` as the parity target.

The paper's update sums ``N`` frozen random rank-``r`` bases, each scaled by two trained diagonals::

    dW = s sum_{b=1..N} B_b diag(lambda_b) A diag(gamma_b),     N = ceil(min(m, n) / r)

with ``A (r, d)`` one random matrix shared by the ``N`` terms, ``B_b (D, r)`` random, ``d = min(m, n)``,
``D = max(m, n)`` (for ``d_out < d_in`` the product is transposed: the small basis sits on the small side), so the
sum reaches full rank ``min(m, n)`` while a layer trains only ``lambda (r, N)`` and ``gamma (N, d)``. ``s`` is the
config's scale: PEFT's ``randlora_alpha / r`` (standard; rsLoRA's ``alpha / sqrt(r)`` is exported with the
``randlora_alpha`` that gives the same ``s``). Here ``rank`` is the bases' rank ``r``: a smaller ``r`` means more
bases and more trained numbers.

As PEFT computes it (the parity target), with ``basis_A (r, d)``, ``basis_B (D, N, r)`` the frozen buffers::

    V = flatten_{(i, b)} lambda[i, b] basis_A[i, :] gamma[b, :]     (r N, d)   row i N + b
    U = flatten_{(b, i)} basis_B[:, b, i]                            (D, N r)   column b r + i
    dW = s U V  (d_in <= d_out),   s (U V)^T  (d_out < d_in)

The two flattenings pair row ``i N + b`` of ``V`` with column ``i N + b`` of ``U``, i.e. with basis ``(i N + b) // r``,
column ``(i N + b) % r`` of ``basis_B``, not with basis ``b``, column ``i`` as the paper's sum does: PEFT's
``B_b`` are a fixed permutation of the drawn columns (the same distribution; the same family of updates). This
file computes PEFT's pairing, so its tensors load into PEFT unchanged.

The bases are shared by every layer of an injection, as PEFT shares one pair per model: each layer holds its
slice ``basis_A = A*[:, 0, :d]``, ``basis_B = B*[:D, :N, :]`` of one ``A* (r, 1, d*)``, ``B* (D*, N*, r)`` sized by
the largest target dims (``lowrank.init.randlora`` draws them as PEFT does from the seed, its
``projection_prng_key``), so a layer carries about one weight's worth of frozen numbers (PEFT holds one pair for
all layers; a saved PEFT adapter also holds a copy per layer). ``lowrank.peft.export`` writes PEFT RandLoRA
(``save_projection=True``: the shared bases rebuilt from the layers' slices); ``lowrank.peft.load`` reads one, the
bases from the file or, without them, drawn again from ``projection_prng_key``. The base weight is never offset.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_adapter
from ..weights import weight_dtype, weight_shape
from .base import Adapter


def basis_shapes(rank: int, d_out: int, d_in: int) -> tuple[int, int, int]:
    """``(N, d, D)``: the number of bases ``ceil(min(m, n) / r)``, ``min(m, n)`` and ``max(m, n)``."""
    small, large = min(d_out, d_in), max(d_out, d_in)
    return -(-small // rank), small, large


@register_adapter("randlora")
class RandLoRALayer(Adapter):
    """RandLoRA (arXiv 2502.00987): shared frozen random bases, trained diagonal scalings lambda, gamma (PEFT's)."""

    kind = "random_basis"
    default_init: ClassVar[str] = "randlora"  # its initializer (LoRAConfig's default "kaiming" does not fit it)

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 options: Any = None):
        super().__init__(options)
        if not self.supports(base_layer):
            raise TypeError(f"RandLoRALayer cannot wrap {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.d_out, self.d_in = weight_shape(base_layer)
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(scaling)
        self.n_bases, small, large = basis_shapes(self.rank, self.d_out, self.d_in)
        w = base_layer.weight
        dt = weight_dtype(base_layer)
        zeros = lambda *shape: torch.zeros(*shape, dtype=dt, device=w.device)  # noqa: E731
        self.register_buffer("basis_A", zeros(self.rank, small))  # (r, d) frozen, shared
        self.register_buffer("basis_B", zeros(large, self.n_bases, self.rank))  # (D, N, r) frozen
        self.lam = nn.Parameter(zeros(self.rank, self.n_bases))  # (r, N) trained
        self.gamma = nn.Parameter(zeros(self.n_bases, small))  # (N, d) trained
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # -- forward ----------------------------------------------------------------------------------
    def _products(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``U (D, N r)`` and ``V (r N, d)`` (module docstring), ``dW = s U V`` or its transpose."""
        V = self.lam.to(dtype)[:, :, None] * self.basis_A.to(dtype)[:, None, :] * self.gamma.to(dtype)[None]
        return self.basis_B.to(dtype).flatten(1), V.flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.dropout(x).to(self.lam.dtype)
        U, V = self._products(self.lam.dtype)
        out = F.linear(F.linear(h, V), U) if self.d_in <= self.d_out else F.linear(F.linear(h, U.T), V.T)
        return y + (out * self.scaling).to(y.dtype)

    # -- weights --------------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s U V`` (or its transpose) as ``(d_out, d_in)``, in ``dtype`` (default the scalings')."""
        U, V = self._products(dtype or self.lam.dtype)
        dw = U @ V
        return self.scaling * (dw if self.d_in <= self.d_out else dw.T)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lam": self.lam, "gamma": self.gamma}

    # -- initialization and saved state -----------------------------------------------------------
    @torch.no_grad()
    def initialize(self, result) -> torch.Tensor | None:
        """The bases and scalings from ``result.extras`` (an initializer of kind ``"random_basis"``; ``A``, ``B``
        are unused placeholders)."""
        if result.offset:
            raise ValueError("the randlora adapter does not offset the base weight; its initializer asked for it")
        self.load_tensors(result.extras)
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"basis_A": self.basis_A, "basis_B": self.basis_B, "lam": self.lam.detach(), "gamma": self.gamma.detach()}

    @classmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        r = info["rank"]
        n_bases, small, large = basis_shapes(r, info["d_out"], info["d_in"])
        return {"basis_A": (r, small), "basis_B": (large, n_bases, r), "lam": (r, n_bases), "gamma": (n_bases, small)}

    @classmethod
    def init_result(cls, tensors: dict[str, torch.Tensor]):
        """Everything is in ``extras``; RandLoRA has no ``A``, ``B`` factors (empty placeholders)."""
        from .base import InitResult

        r = tensors["lam"].shape[0]
        return InitResult(A=tensors["lam"].new_zeros(r, 0), B=tensors["lam"].new_zeros(0, r), extras=dict(tensors))

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in ("basis_A", "basis_B", "lam", "gamma"):
            getattr(self, key).copy_(tensors[key])

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank} ({self.n_bases} bases), alpha={self.alpha:g}, "
                f"scaling={self.scaling:.4g}, trainable=lam ({self.rank}x{self.n_bases}) + gamma "
                f"({self.n_bases}x{min(self.d_out, self.d_in)}), merged={self.merged}")
