"""CorDA: Context-oriented Decomposition Adaptation.

Yang et al. 2024, arXiv 2406.05223. With ``C = X^T X / N`` the layer-input covariance (``(d_in,
d_in)``, over all token rows of the data, padding excluded), damped to ``C' = C + delta I`` where it
is singular:

    W0 C' = U S V^T,    W0 = U S (V^T C'^{-1})                            (exact)
    IPM (instruction-previewed, C from task data):   adapter = the top-r components
    KPM (knowledge-preserving, C from data whose knowledge to keep): adapter = the bottom-r components
    A = diag(sqrt(S_I / s)) (V^T C'^{-1})_I    (r, d_in)
    B = U_I diag(sqrt(S_I / s))                (d_out, r)
    W = W0 - s B A = W0 - U_I S_I (V^T C'^{-1})_I                          (the output is unchanged)

Damping as in the authors' code and PEFT: ``delta = d mean(diag C)``, ``d`` from ``damping`` (0.01)
doubling until ``||C' C'^{-1} - I||_F < damping_tol`` (at most ``max_doublings`` times, then an error).
So ``C`` is always damped, by at least ``0.01 mean(diag C)``, also when it is well conditioned (the
reconstruction ``W0 = U S V^T C'^{-1}`` is exact either way).
Computed in float64 on the layer's device.

Where lowrank differs from PEFT's ``preprocess_corda`` (checked in ``tests/test_corda.py``): PEFT
divides each sample's activations by their (signed) maximum before summing ``x^T x`` and includes
padding tokens; lowrank uses the paper's ``C = X^T X / N`` over the non-padding rows. Given the same
``C`` (PEFT's ``covariance_file``), the factors and the residual agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, LayerContext
from .gradient import DataInitializer, DataOptions

MODES = ("ipm", "kpm")


def damped_inverse(C: torch.Tensor, *, damping: float, tol: float, max_doublings: int,
                   name: str = "?") -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(C', C'^{-1}, d)`` with ``C' = C + d mean(diag C) I`` and ``d`` the first of ``damping * 2^k``
    (``k <= max_doublings``) for which ``||C' C'^{-1} - I||_F < tol``; a ``ValueError`` naming the layer if none."""
    C = (C.double() + C.double().T) / 2
    n = C.shape[0]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    scale = C.diagonal().mean()
    if not torch.isfinite(C).all() or not scale > 0:
        raise ValueError(f"corda: layer {name!r} has an input covariance that is zero or not finite (mean diagonal "
                         f"{scale.item():.3g}): the data gives it no input. Pass data that reaches the layer or drop it "
                         "from targets")
    d, err = damping, float("inf")
    for _ in range(max_doublings + 1):
        Cd = C + d * scale * eye
        try:
            inv = torch.linalg.inv(Cd)
            err = torch.linalg.matrix_norm(Cd @ inv - eye).item()
        except RuntimeError:  # exactly singular in float64
            err = float("inf")
        if err < tol:
            return Cd, inv, d
        d *= 2
    raise ValueError(f"corda: layer {name!r} has an input covariance singular beyond the damping: "
                     f"||C' C'^-1 - I||_F = {err:.3g} >= damping_tol={tol} after damping {d / 2:.3g} x mean(diag C). "
                     "Pass more (or more varied) data, raise init_options['damping'] or 'max_doublings'")


@register_initializer("corda")
class CorDA(DataInitializer):
    """CorDA (arXiv 2406.05223): adapter from the covariance-oriented SVD of W0 C (IPM top-r, KPM bottom-r)."""

    offset = True

    needs = ("covariance",)

    @dataclass(frozen=True)
    class Options(DataOptions):
        mode: str = "ipm"
        """``ipm`` (adapt the top-r components) or ``kpm`` (adapt the bottom-r, keep the top frozen)."""
        damping: float = 0.01
        """First damping factor ``d`` of ``C + d mean(diag C) I``."""
        damping_tol: float = 0.05
        """Accept ``C'`` when ``||C' C'^{-1} - I||_F`` is below this."""
        max_doublings: int = 20
        """Doublings of ``d`` before a covariance counts as singular beyond the damping."""

        def __post_init__(self):
            super().__post_init__()
            if self.mode not in MODES:
                raise ValueError(f"invalid mode={self.mode!r}: must be one of {MODES}")
            for key in ("damping", "damping_tol"):
                v = getattr(self, key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise ValueError(f"invalid {key}={v!r}: must be a number > 0")
            if isinstance(self.max_doublings, bool) or not isinstance(self.max_doublings, int) or self.max_doublings < 0:
                raise ValueError(f"invalid max_doublings={self.max_doublings!r}: must be an int >= 0")

    def init_layer(self, ctx: LayerContext) -> InitResult:
        o, r = self.options, ctx.rank
        Cd, inv, _ = damped_inverse(ctx.covariance().to(ctx.device), damping=o.damping, tol=o.damping_tol,
                                    max_doublings=o.max_doublings, name=ctx.name)
        U, S, Vh = torch.linalg.svd(ctx.weight.double() @ Cd, full_matrices=False)  # (m, k), (k,), (k, n)
        idx = slice(0, r) if o.mode == "ipm" else slice(S.numel() - r, S.numel())
        root = (S[idx] / ctx.scaling).sqrt()
        A = root[:, None] * (Vh[idx] @ inv)  # (r, n)
        B = U[:, idx] * root[None, :]  # (m, r)
        return InitResult(A=A.float(), B=B.float(), offset=True)
