"""RAC-LoRA, Randomized Asymmetric Chain of LoRA (Malinovsky et al. 2024, arXiv 2410.08305), Algorithm 1.

Each link draws one factor at random, keeps it frozen, and trains the other from zero; at the knot the link is
merged, ``W <- W + s B A``. The frozen side is fixed for the whole chain:

- ``train="A"`` (the paper's left sketch): ``B_S ~ D`` frozen, ``A`` trained from 0; with one gradient step per link
  this is ``W <- W - gamma H_B grad f(W)``, ``H_B = B_S (B_S^T B_S)^+ B_S^T`` a random rank-``r`` projection;
- ``train="B"`` (right sketch): ``A_S ~ D`` frozen, ``B`` trained from 0; ``W <- W - gamma grad f(W) H_A``.

The convergence results (Theorems 5.3, 5.5) need ``E[H]`` positive definite, which a rotation-invariant sketch
gives (``E[H] = (r / d) I``); a fresh draw every link is what separates RAC-LoRA from AsymmLoRA's one fixed factor.
Sketches: ``gaussian`` (i.i.d. ``N(0, std^2)``; the authors' code draws ``std = 1``) or ``orthogonal`` (Haar:
orthonormal columns of ``B_S`` / rows of ``A_S``, so one gradient step on the trained factor *is* the projected
step). The authors' code keeps one AdamW and its state across links (``reset_optimizer=False``, the default
here); the paper does not say. 10 links by default (the paper's GLUE runs: 10 links).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..init.base import InitResult
from ..registry import register_chain
from .base import Chain, ChainOptions, Link

SKETCHES = ("gaussian", "orthogonal")


@register_chain("rac_lora")
class RACLoRA(Chain):
    """RAC-LoRA (arXiv 2410.08305): each link freezes a fresh random factor, trains the other from zero, merges."""

    default_links = 10
    reinit_first = True
    freezes_factors = True

    @dataclass(frozen=True)
    class Options(ChainOptions):
        train: str = "A"
        """The trained factor: ``"A"`` (a random ``B`` frozen, the left sketch) or ``"B"`` (a random ``A`` frozen)."""
        sketch: str = "gaussian"
        """The frozen factor's distribution: ``gaussian`` (``N(0, std^2)`` entries) or ``orthogonal`` (Haar)."""
        std: float = 1.0
        """``gaussian``: the entries' standard deviation (the authors' code: 1)."""
        reset_optimizer: bool = False

        def __post_init__(self):
            super().__post_init__()
            if self.train not in ("A", "B"):
                raise ValueError(f"invalid train={self.train!r}: 'A' (B frozen) or 'B' (A frozen)")
            if self.sketch not in SKETCHES:
                raise ValueError(f"invalid sketch={self.sketch!r}: one of {SKETCHES}")
            if not (isinstance(self.std, (int, float)) and self.std > 0 and self.std < float("inf")):
                raise ValueError(f"invalid std={self.std!r}: a positive finite number")

    def link(self, index, layers, generator) -> Link:
        return Link(train=(self.options.train,))

    def init_link(self, ctx, link) -> InitResult:
        o, r = self.options, ctx.rank
        if o.train == "A":  # B_S (m, r) frozen, A = 0
            return InitResult(A=ctx.zeros(r, ctx.n), B=self._sketch(ctx, ctx.m, r))
        return InitResult(A=self._sketch(ctx, ctx.n, r).T.contiguous(), B=ctx.zeros(ctx.m, r))

    def _sketch(self, ctx, d: int, r: int) -> torch.Tensor:
        """``(d, r)``: i.i.d. Gaussian, or Haar-distributed orthonormal columns (QR of a Gaussian, signs fixed)."""
        X = ctx.randn(d, r)
        if self.options.sketch == "gaussian":
            return self.options.std * X
        Q, R = torch.linalg.qr(X.double())  # float64: orthonormal to the precision of the factors' dtype
        return Q * torch.sign(torch.diagonal(R))
