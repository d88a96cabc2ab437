"""KaSA: knowledge-aware singular-value adaptation (Wang, Jiang, Park, Kim, Tang 2024, arXiv 2412.06071), with
PEFT 0.21's ``LoraConfig(kasa_config=KasaConfig(...))`` (``KasaLinearVariant``, ``LoraModel._get_kasa_loss``) as
the parity target.

The paper (i) truncates the base weight to its top ``k - r`` singular triplets, ``k = min(d_out, d_in)``
(``W_world``: the ``r`` smallest, "noisy / long-tail" components are dropped), and (ii) trains an update in SVD
form ``dU dS dV^T`` whose diagonal ``dS`` holds learnable "knowledge-aware" singular values::

    y = W x + b + s * B diag(d) A dropout(x),   A: (r, d_in), B: (d_out, r), d: (r,)   (B = dU, A = dV^T, d = dS)
    W = W0 - s B0 A0,   s B0 A0 = U_m diag(S_m) V_m^T   (the r minor singular triplets of W0 = U S V^T)

trained with two auxiliary terms (the paper's Eqs. 9-12; :func:`kasa_loss` returns them, to add to the task loss)::

    L = L_task + beta * ||d||^2 + gamma * (||B^T B - I_r||_F + ||A A^T - I_r||_F)       summed over the layers

``s`` is LoRA's scale (``alpha / r``, or rsLoRA's), ``beta`` and ``gamma`` the adapter's options (PEFT's
``KasaConfig``: ``1e-4`` and ``1e-3``, the reference GLUE values). The ``kasa`` initializer
(:mod:`lowrank.init.kasa`) sets ``A``, ``B = 0``, ``d`` and the truncation.

The truncation is recorded as lowrank's offset (``A0``, ``B0``: the minor part, balanced as MiLoRA's factors), so
the dropped components are kept: ``lowrank.unload(model, merge=False)`` puts the original ``W0`` back (up to one
rounding of the weight's dtype), ``save_adapter`` stores ``A0``, ``B0`` and ``load_adapter`` rebuilds the same
truncated base from the original model, merge / unmerge round-trip to the truncated base.

Where PEFT (and the reference code, github.com/juyongjiang/KaSA) depart from the paper or from this layer:

- PEFT's truncation is destructive: unloading keeps the truncated weight; here the offset record restores ``W0``.
- PEFT computes the truncated base as ``U_p diag(S_p) V_p^T`` (the top ``k - r`` triplets); here it is
  ``W0 - U_m diag(S_m) V_m^T``, the same matrix up to float32 rounding; ``A0``, ``B0`` are kept in the adapter's
  dtype (bfloat16 for a bfloat16 model: the removed minor part is rounded there, where PEFT rounds the result).
- PEFT refuses ``Conv1D`` (``fan_in_fan_out``) layers; here the ``(d_out, d_in)`` view is truncated, so GPT-2's
  ``Conv1D`` works as ``nn.Linear`` does.
- The reference code keeps ``d_in - r`` triplets (not ``min(d_out, d_in) - r``: a layer with ``d_in > d_out``
  may lose nothing), and its orthogonality term uses the ``(d_in, d_in)`` and ``(d_out, d_out)`` Grams
  ``A^T A``, ``B B^T`` (never ``I``: their rank is ``r``), with the whole auxiliary loss divided by the number of
  layers. PEFT and this module use the paper's ``r x r`` Grams and sum over the layers.
- PEFT draws ``A`` and ``d`` from the global RNG, here from the layer's seeded generator (same distributions).

``factors()`` is ``None``: the update is not ``s B A``, so the preconditioners that transform ``(grad_A,
grad_B)`` (and ``lowrank.theory``'s alignment) do not apply; ``A``, ``B`` and ``d`` are trained as plain adapter
parameters. PEFT can hold the layer (``lora_A``, ``lora_B``, ``lora_diag`` of a KaSA LoRA, for ``nn.Linear``),
but ``lowrank.peft.export`` does not write that format yet and refuses the adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_adapter
from ..weights import apply_offset, weight_dtype
from .lora import LoRALayer


def _coefficient(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid {name}={value!r}: must be a finite number >= 0 (0 turns the term off)")


@register_adapter("kasa")
class KaSALayer(LoRALayer):
    """KaSA (arXiv 2412.06071): ``s B diag(d) A`` with trainable singular values ``d`` on a truncated base."""

    kind = "kasa"
    default_init = "kasa"  # its initializer (LoRAConfig's default "kaiming" does not fit it)

    @dataclass(frozen=True)
    class Options:
        beta: float = 1e-4
        """Weight of ``||d||^2`` in :func:`kasa_loss` (PEFT's ``KasaConfig.beta``)."""
        gamma: float = 1e-3
        """Weight of ``||B^T B - I||_F + ||A A^T - I||_F`` in :func:`kasa_loss` (PEFT's ``KasaConfig.gamma``)."""

        def __post_init__(self):
            _coefficient("beta", self.beta)
            _coefficient("gamma", self.gamma)

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 options: Any = None):
        super().__init__(base_layer, rank, alpha, scaling, dropout, options)
        dt = weight_dtype(base_layer)  # a 4-bit layer's packed weight is uint8
        self.diag = nn.Parameter(torch.zeros(self.rank, dtype=dt, device=base_layer.weight.device))  # (r,)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x).to(self.A.dtype), self.A) * self.diag  # (..., r)
        return y + (F.linear(h, self.B) * self.scaling).to(y.dtype)

    # -- weights --------------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s * B diag(d) A`` as ``(d_out, d_in)``, in ``dtype`` (default the factors')."""
        dt = dtype or self.A.dtype
        return self.scaling * ((self.B.to(dt) * self.diag.to(dt)) @ self.A.to(dt))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B, "diag": self.diag}

    def factors(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        return None  # the update is s B diag(d) A, not the s B A a preconditioner assumes

    def regularization(self, beta: float | None = None, gamma: float | None = None) -> torch.Tensor:
        """``beta ||d||^2 + gamma (||B^T B - I_r||_F + ||A A^T - I_r||_F)`` in float32 (float64 for float64 factors),
        differentiable; ``beta`` / ``gamma`` default to the layer's options."""
        beta = self.options.beta if beta is None else beta
        gamma = self.options.gamma if gamma is None else gamma
        dt = torch.promote_types(self.A.dtype, torch.float32)
        A, B, d = self.A.to(dt), self.B.to(dt), self.diag.to(dt)
        eye = torch.eye(self.rank, dtype=dt, device=A.device)
        orthogonality = torch.linalg.matrix_norm(B.T @ B - eye) + torch.linalg.matrix_norm(A @ A.T - eye)
        return beta * (d * d).sum() + gamma * orthogonality

    # -- initialization and saved state -----------------------------------------------------------
    @torch.no_grad()
    def initialize(self, result) -> torch.Tensor | None:
        """``A``, ``B``, ``d`` (``result.extras["diag"]``) from ``result``; with ``result.offset`` the base becomes
        ``W0 - s B0 A0`` (``(A0, B0)``: ``result.subtracted()``; returns the old data)."""
        if "diag" not in result.extras:
            raise ValueError("the kasa adapter needs its singular values d: its initializer must return "
                             "InitResult(extras={'diag': <tensor (r,)>}) (the 'kasa' initializer does)")
        self.diag.copy_(result.extras["diag"])
        self.set_factors(result.A, result.B)
        if not result.offset:
            return None
        A0, B0 = result.subtracted()
        return apply_offset(self, (A0.to(self.A), B0.to(self.B)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "diag": self.diag.detach()}

    @classmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(info), "diag": (info["rank"],)}

    @classmethod
    def init_result(cls, tensors: dict[str, torch.Tensor]):
        from .base import InitResult

        offset = "A0" in tensors
        return InitResult(A=tensors["A"], B=tensors["B"], offset=offset, extras={"diag": tensors["diag"]},
                          offset_factors=(tensors["A0"], tensors["B0"]) if offset else None)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Trained ``A``, ``B``, ``d``; the base is rebuilt from the saved ``A0``, ``B0`` if they differ from the
        layer's (as LoRA's)."""
        super().load_tensors(tensors)
        self.diag.copy_(tensors["diag"])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kasa=True, beta={self.options.beta:g}, gamma={self.options.gamma:g}"


def kasa_loss(model: nn.Module, beta: float | None = None, gamma: float | None = None) -> torch.Tensor:
    """KaSA's auxiliary loss, summed over the model's ``kasa`` layers (PEFT's ``LoraModel._get_kasa_loss``)::

        sum_layers  beta ||d||^2 + gamma (||B^T B - I_r||_F + ||A A^T - I_r||_F)

    a differentiable scalar (float32) to add to the task loss before ``backward``. ``beta`` / ``gamma`` default
    to each layer's options (``LoRAConfig(adapter="kasa", adapter_options={"beta": ..., "gamma": ...})``). A
    ``torch.compile`` / ``DataParallel`` / DDP wrapper may be passed as is."""
    for name, value in (("beta", beta), ("gamma", gamma)):
        if value is not None:
            _coefficient(name, value)
    layers = [m for m in model.modules() if isinstance(m, KaSALayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no kasa adapter layers; kasa_loss is KaSA's regularizer: inject "
                         "with LoRAConfig(adapter='kasa', init='kasa'), or leave it out of the loss for other adapters")
    terms = [layer.regularization(beta, gamma).float() for layer in layers]
    return sum(terms[1:], terms[0])


KaSALayer.auxiliary_loss = staticmethod(kasa_loss)
