"""PiSSA: Principal Singular values and Singular vectors Adaptation.

Meng, Wang, Zhang 2024, arXiv 2404.02948. With ``W0 = U S V^T`` and scale ``s``:

    B = U_r diag(sqrt(S_r / s))        (d_out, r)
    A = diag(sqrt(S_r / s)) V_r^T      (r, d_in)
    W = W0 - s B A = W0 - U_r S_r V_r^T   (the residual; the output is unchanged)

so ``s B A`` is the best rank-``r`` approximation of ``W0`` and the factors are balanced
(``A A^T = B^T B = diag(S_r) / s``). ``svd="randomized"`` uses a seeded block Krylov method
(``lowrank.init.svd``) whose search space is ``(niter + 1)`` times the block size: PEFT's
``pissa_niter_N`` samples only ``q = r`` directions with no seed, which leaves a large error
on the rank-``r`` part and differs on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext
from .svd import check_svd_options, top_svd


@dataclass(frozen=True)
class SVDOptions:
    svd: str = "full"
    """``full`` (exact) or ``randomized`` (seeded block Krylov)."""
    oversample: int | None = None
    """Randomized SVD: block size r + oversample (None: r, a block of 2r)."""
    niter: int = 8
    """Randomized SVD: Krylov depth (search space of (r + oversample)(niter + 1) directions)."""

    def __post_init__(self):
        check_svd_options(self.svd, self.oversample, self.niter)


def balanced_factors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = diag(sqrt(S / s)) V^T``, ``B = U diag(sqrt(S / s))``, so ``s B A = U diag(S) V^T``."""
    root = torch.sqrt(S / scaling)
    return root[:, None] * V.T, U * root[None, :]


@register_initializer("pissa")
class PiSSA(Initializer):
    """PiSSA (arXiv 2404.02948): adapt the top-r singular part of W0, freeze the residual."""

    offset = True

    Options = SVDOptions

    def init_layer(self, ctx: LayerContext) -> InitResult:
        o = self.options
        U, S, V = top_svd(ctx.weight, ctx.rank, method=o.svd, oversample=o.oversample, niter=o.niter,
                          generator=ctx.generator)
        A, B = balanced_factors(U, S, V, ctx.scaling)
        return InitResult(A=A, B=B, offset=True)
