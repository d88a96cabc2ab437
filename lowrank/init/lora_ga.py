"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation.

Wang, Yu, Li 2024, arXiv 2407.05000, Algorithm 1 (the theorem it rests on: ``docs/theory.md``, section 2).

1. ``G = dL/dW`` at initialization, the mean over a few batches (``lowrank.init.gradient``).
2. ``G = U S V^T``; take the top ``2r`` triplets, split them into two disjoint index sets ``I_A``, ``I_B``.
3. ``A = c V[:, I_A]^T`` (``(r, d_in)``), ``B = c U[:, I_B]`` (``(d_out, r)``): pure singular vectors,
   both scaled by ``c`` (``stable``: ``c = m^(1/4) / sqrt(gamma)``; see ``lowrank.init.scale``).
4. ``W = W0 - s B A`` so the output is unchanged at step 0.

Then the first SGD step moves ``s B A`` by ``-lr s^2 (B B^T G + G A^T A) = -lr zeta G_2r`` with
``zeta = s^2 c^2``: the best rank-``2r`` approximation of the (scaled) first full fine-tuning step.
The paper uses rsLoRA, ``s = alpha / sqrt(r)``; with it and ``stable`` the output scale is
``alpha^2 / gamma^2`` per coordinate whatever the rank and width.

Directions (index sets over the top ``2r``): ``ArB2r`` (default) ``I_A = 0..r-1``, ``I_B = r..2r-1``;
``A2rBr`` the reverse; ``ArBr`` ``I_A`` odd, ``I_B`` even; ``random`` a seeded disjoint split.

Unlike PEFT's ``lora_ga``, ``B`` is not multiplied by singular values and both factors are
scaled, so the alignment theorem holds exactly; ``random`` never reuses an index.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, LayerContext
from .gradient import GradientInitializer, GradientOptions
from .scale import check_scale, scale_factor
from .svd import check_svd_options

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")


def split_indices(direction: str, r: int, generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """``(I_A, I_B)``: disjoint index sets of size ``r`` among the top ``2r`` singular triplets."""
    if direction == "ArB2r":
        return list(range(r)), list(range(r, 2 * r))
    if direction == "A2rBr":
        return list(range(r, 2 * r)), list(range(r))
    if direction == "ArBr":
        return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    if direction == "random":
        perm = torch.randperm(2 * r, generator=generator).tolist()
        return sorted(perm[:r]), sorted(perm[r:])
    raise ValueError(f"invalid direction {direction!r}: must be one of {DIRECTIONS}")


@register_initializer("lora_ga")
class LoRAGA(GradientInitializer):
    """LoRA-GA (arXiv 2407.05000): A, B from the SVD of the full-weight gradient, stable scale, offset base."""

    offset = True

    @dataclass(frozen=True)
    class Options(GradientOptions):
        direction: str = "ArB2r"
        """Split of the top 2r triplets: ``ArB2r``, ``A2rBr``, ``ArBr`` or ``random`` (seeded)."""
        scale: str = "stable"
        """Factor ``c`` on both A and B: ``stable``, ``gd``, ``unit`` or ``weight``."""
        stable_gamma: float = 16.0
        """``gamma`` of the stable scale ``c = m^(1/4) / sqrt(gamma)``."""
        svd: str = "auto"
        """``auto`` (exact up to 512 wide, randomized beyond), ``full`` (exact) or ``randomized`` (seeded block Krylov)."""
        oversample: int | None = None
        """Randomized SVD: block size 2r + oversample (None: 2r, a block of 4r)."""
        niter: int | None = None
        """Randomized SVD: Krylov depth (search space of (2r + oversample)(niter + 1) directions); default 4
        for ``svd="randomized"``, 2 for the layers ``svd="auto"`` factorizes randomized (first step within 1e-3
        of the Eckart-Young floor there, ``lowrank.init.svd.AUTO_FULL_MAX``)."""

        def __post_init__(self):
            super().__post_init__()
            if self.direction not in DIRECTIONS:
                raise ValueError(f"invalid direction={self.direction!r}: must be one of {DIRECTIONS}")
            check_scale(self.scale, self.stable_gamma)
            check_svd_options(self.svd, self.oversample, 0 if self.niter is None else self.niter)

    _warned_scaling = False
    sketchable = True

    def triplets(self, rank: int) -> int:
        return 2 * rank

    def check_layer(self, ctx: LayerContext) -> None:
        super().check_layer(ctx)
        if 2 * ctx.rank > min(ctx.m, ctx.n):
            raise ValueError(f"lora_ga needs 2r <= min(d_out, d_in), but r={ctx.rank} and layer {ctx.name!r} is "
                             f"{ctx.m} x {ctx.n}; the largest valid rank is {min(ctx.m, ctx.n) // 2}")
        if not ctx.rslora and not self._warned_scaling:
            self._warned_scaling = True
            warnings.warn("lora_ga is defined with rsLoRA scaling (s = alpha / sqrt(r)); this layer's scale is "
                          f"{ctx.scaling:.4g} = alpha / r. Pass scaling='rslora' to follow the paper.", stacklevel=4)

    def init_layer(self, ctx: LayerContext) -> InitResult:
        o, r = self.options, ctx.rank
        niter = o.niter if o.niter is not None else (2 if o.svd == "auto" else 4)
        U, _, V = ctx.gradient_svd(2 * r, method=o.svd, oversample=o.oversample, niter=niter,
                                   generator=ctx.generator)  # (m, 2r), (n, 2r)
        ia, ib = split_indices(o.direction, r, ctx.generator)
        c = scale_factor(o.scale, m=ctx.m, rank=r, scaling=ctx.scaling, gamma=o.stable_gamma,
                         weight=ctx.weight if o.scale == "weight" else None)
        A = c * V[:, ia].T  # (r, n)
        B = c * U[:, ib]  # (m, r)
        return InitResult(A=A.to(ctx.device), B=B.to(ctx.device), offset=True)
