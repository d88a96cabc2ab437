"""LoRA-DA: Data-Aware Initialization for Low-Rank Adaptation via Asymptotic Analysis.

Zhang, Chu, Peng, Li, Luo, Jiang, Huang (ICML 2026), arXiv 2510.24561; authors' code github.com/zqy0126/LoRA-DA
(``lora_da.py``, ``run_exp.py``, ``conf/lora_da.yaml``). The paper writes ``W (d_in, d_out)``, ``W0 + A B`` with
``A (d_in, r)``; below everything is in lowrank's ``(m, n) = (d_out, d_in)``, so the paper's ``A`` is ``A^T`` here.

The objective: the fine-tuned ``W^`` (the MLE over ``N`` examples, restricted to the adapter's subspace) should be
close to the target ``W_tgt``; asymptotically ``E ||W^ - W_tgt||_F^2 = bias + variance`` and, for ``A`` with
orthonormal rows (``P = A^T A``), the subspace that minimizes it is the ``r`` smallest eigenvectors of the
*initialization guidance matrix* ``Omega`` (Ky Fan):

    E ||W^ - W_tgt||^2 ~ ||D (I - P)||_F^2 + tr(P sum_i J^-1_[i]) / N = ||D||_F^2 + tr(A Omega A^T)
    Omega = beta (tr Y^-1 / N) Z^-1  -  D^T D                     (n, n)

with the statistics of one data pass (K-FAC, ``J ~ Z (x) Y`` per output unit ``i``: ``J^-1_[i] = y_i Z^-1``):

    G  = the mean gradient dL/dW0                                 ``"gradient"``              (m, n)
    Z  = X^T X / N_x + lambda I                                   ``"covariance"``            (n, n)
    y_i = 1 / (q_i + lambda_y),  q_i = sum_t g_{t,i}^2 / N_x       ``"output_gradient_moment"`` (m,)
    D  = -diag(y) G Z^-1     the Fisher-gradient estimate of W_tgt - W0 (the natural-gradient step)

and ``A0 = `` those eigenvectors ``(n, r)``. Then ``B0 = D A0`` (the paper's ``B0 = A0^T (W_tgt - W0)``): the adapter
starts at the target's projection onto its subspace and the base is **not** offset (the output moves, as in the
paper and the authors' code). Scales (``scale``):

- ``stable`` (default, the authors' code, ``normalize_delta`` and ``stable_gamma``): ``D`` divided by its top singular
  value, both factors by ``sqrt(gamma)``: ``A = A0^T / sqrt(gamma)``, ``B = D A0 / (sigma_1(D) sqrt(gamma))``,
  ``s B A = (s / (gamma sigma_1(D))) D P``. The eigenvectors do not depend on it (``Omega / sigma_1^2`` is the code's).
- ``paper``: ``A = A0^T``, ``B = D A0 / s``, ``s B A = D P`` exactly, the displacement's projection (its size is the
  K-FAC step's, which scales as ``1 / lambda`` in directions the data does not excite).

Hyperparameters: ``beta`` (``variance_weight``) 1 in the paper's ``Omega``; the authors' experiments use
``da_variance_beta = 0.03`` with their ``da_bias_alpha = 1`` (only ``beta / alpha`` matters for ``A0``).
``N`` (``num_samples``) is the number of fine-tuning examples (the authors pass the training set's size); the data
pass cannot know it: without it the variance term is dropped (``N -> infinity``, with a warning). ``lambda = 1e-6``
on both factors, absolute, as the code (``fisher_damping``); ``output_damping_ratio`` is the code's
``fisher_output_damping_ratio``: ``lambda_y = ratio * median(q)``. The degenerate case (Remark 4.3: no variance term,
``Z = I`` and ``Y = I``) is LoRA-GA / LoRA-One's subspace, the top ``r`` right singular vectors of ``G``.

Where lowrank differs from the authors' code (``output_fisher_mode="diagonal"``, their default and
configuration): the eigenvectors are exact (``torch.linalg.eigh`` in float64 on the layer's device, three
``(d_in, d_in)`` float64 matrices at the peak), where the code runs 10 LOBPCG iterations from a seeded random start; ``sigma_1(D)`` is exact (the code: ``svd_lowrank``, 16 iterations); ``Z``
is lowrank's ``"covariance"`` (padding masked, as the code's ``attention`` token mask), grouped per layer rather
than shared by q/k/v; ``G`` is the mean over batches (the code's mean over single-example batches).
``y_i = 1 / (q_i + lambda)`` is the inverse of ``Y``'s diagonal, the code's default; the paper's
``[Y^-1]_ii`` of the full ``Y`` (the code's ``sequence_lowrank`` mode estimates it) is not implemented: it needs
``Y (m, m)`` per layer. ``balance=True`` is the code's ``balance_factors`` (``B = U S W^T`` -> ``U sqrt(S)``,
``sqrt(S) W^T A``; same product); ``offset=True`` (not in the paper) subtracts ``s B A`` from the base so the
output is unchanged, for ablations. The code's ``normalize_variance_guidance`` is not implemented.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, LayerContext
from .gradient import DataInitializer, DataOptions

SCALES = ("stable", "paper")


def fisher_gradient(G: torch.Tensor, C: torch.Tensor, q: torch.Tensor, *, damping: float,
                    output_damping_ratio: float | None = None,
                    name: str = "?") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(D, Z^-1, y)`` in float64: ``D = -diag(y) G Z^-1`` (module docstring), ``Z = C + lambda I``,
    ``y = 1 / (q + lambda_y)``."""
    C = C.double()
    Z = (C + C.T) / 2
    Z.diagonal().add_(damping)
    L, info = torch.linalg.cholesky_ex(Z)
    if int(info) != 0 or not torch.isfinite(Z).all():
        raise ValueError(f"lora_da: layer {name!r} has an input covariance that is not positive definite after the "
                         f"damping {damping:g} (or not finite): raise init_options['damping'] or pass data that "
                         "reaches the layer")
    q = q.double()
    lam_y = damping if output_damping_ratio is None else max(output_damping_ratio * q.median().item(),
                                                             torch.finfo(torch.float64).tiny)
    y = 1.0 / (q + lam_y)
    Z_inv = torch.cholesky_inverse(L)
    D = -(y[:, None] * torch.cholesky_solve(G.double().T, L).T)  # G Z^-1 = (Z^-1 G^T)^T, Z symmetric
    return D, Z_inv, y


def guidance_matrix(D: torch.Tensor, Z_inv: torch.Tensor, y: torch.Tensor, *, variance_weight: float,
                    num_samples: int | None) -> torch.Tensor:
    """``Omega = beta (sum_i y_i / N) Z^-1 - D^T D`` ``(n, n)``; without ``N`` the bias term alone."""
    omega = -(D.T @ D)
    if num_samples is not None and variance_weight != 0:
        omega.add_(Z_inv, alpha=variance_weight * y.sum().item() / num_samples)
    return (omega + omega.T) / 2


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U S W^T`` (thin SVD): ``(sqrt(S) W^T A, U sqrt(S))``, the same product ``B A``."""
    U, S, Wh = torch.linalg.svd(B, full_matrices=False)
    root = S.sqrt()
    return root[:, None] * (Wh @ A), U * root[None, :]


@register_initializer("lora_da")
class LoRADA(DataInitializer):
    """LoRA-DA (arXiv 2510.24561): A from the smallest eigenvectors of the Fisher guidance matrix, B = D A0."""

    needs = ("gradient", "covariance", "output_gradient_moment")
    preserves_output = False

    @dataclass(frozen=True)
    class Options(DataOptions):
        num_samples: int | None = None
        """``N``, the number of fine-tuning examples in the variance term ``beta tr(Y^-1) Z^-1 / N`` (the authors:
        the training set's size). ``None``: the variance term is dropped (``N -> infinity``)."""
        variance_weight: float = 1.0
        """``beta`` on the variance term (the paper's ``Omega``: 1; the authors' experiments: 0.03)."""
        damping: float = 1e-6
        """``lambda`` added to ``Z``'s diagonal and to ``q`` (absolute, as the authors' ``fisher_damping``)."""
        output_damping_ratio: float | None = None
        """If set, ``q``'s damping is ``ratio * median(q)`` instead of ``damping`` (the code's option; torch's median,
        the lower of the two middle values)."""
        scale: str = "stable"
        """``stable`` (the authors' code: ``D / sigma_1(D)``, both factors ``/ sqrt(gamma)``) or ``paper``
        (``s B A = D P``)."""
        stable_gamma: float = 1024.0
        """``gamma`` of ``scale="stable"`` (the authors' configuration: 1024)."""
        balance: bool = False
        """Rebalance ``A``, ``B`` by the SVD of ``B`` (the code's ``balance_factors``); the product is unchanged."""
        offset: bool = False
        """Offset the base by ``s B A`` so the output is unchanged (not in the paper; for ablations)."""

        def __post_init__(self):  # types are checked from the annotations (lowrank._options); ranges here
            super().__post_init__()
            if self.num_samples is not None and self.num_samples <= 0:
                raise ValueError(f"invalid num_samples={self.num_samples!r}: must be a positive int (the number of "
                                 "fine-tuning examples) or None (no variance term)")
            for key, floor in (("variance_weight", ">= 0"), ("damping", "> 0"), ("output_damping_ratio", "> 0"),
                               ("stable_gamma", "> 0")):
                v = getattr(self, key)
                if v is not None and (v < 0 if floor == ">= 0" else v <= 0):
                    raise ValueError(f"invalid {key}={v!r}: must be {floor}")
            if self.scale not in SCALES:
                raise ValueError(f"invalid scale={self.scale!r}: must be one of {SCALES}")

    def __init__(self, **options):
        super().__init__(**options)
        self.offset = self.options.offset
        self.preserves_output = self.options.offset
        self._warned_n = False

    def check_layer(self, ctx: LayerContext) -> None:
        super().check_layer(ctx)
        if ctx.rank > ctx.n:
            raise ValueError(f"lora_da needs r <= d_in (r eigenvectors of the (d_in, d_in) guidance matrix), but "
                             f"r={ctx.rank} and layer {ctx.name!r} has d_in={ctx.n}; use rank <= {ctx.n}")
        o = self.options
        if o.num_samples is None and o.variance_weight != 0 and not self._warned_n:
            self._warned_n = True
            warnings.warn("lora_da: no num_samples (the number of fine-tuning examples N), so the variance term "
                          "beta tr(Y^-1) Z^-1 / N is dropped; pass init_options={'num_samples': len(train_set)} for "
                          "the paper's guidance matrix (or variance_weight=0 to silence this)", stacklevel=4)

    def init_layer(self, ctx: LayerContext) -> InitResult:
        o, r, dev = self.options, ctx.rank, ctx.device
        D, Z_inv, y = fisher_gradient(ctx.gradient().to(dev), ctx.covariance().to(dev),
                                      ctx.stat("output_gradient_moment").to(dev), damping=o.damping,
                                      output_damping_ratio=o.output_damping_ratio, name=ctx.name)
        omega = guidance_matrix(D, Z_inv, y, variance_weight=o.variance_weight, num_samples=o.num_samples)
        A0 = torch.linalg.eigh(omega)[1][:, :r]  # (n, r): the r smallest, orthonormal columns
        if o.scale == "stable":
            sigma = torch.linalg.matrix_norm(D, ord=2).item()
            if not sigma > 0:
                raise ValueError(f"lora_da: layer {ctx.name!r} has a zero gradient, so no displacement to normalize: "
                                 "pass data whose loss depends on the layer, or drop it from targets")
            c = 1.0 / math.sqrt(o.stable_gamma)
            A, B = c * A0.T, (c / sigma) * (D @ A0)
        else:
            A, B = A0.T.clone(), (D @ A0) / ctx.scaling
        if o.balance:
            A, B = balance_factors(A, B)
        return InitResult(A=A.float(), B=B.float(), offset=o.offset)
