"""Small ``r x r`` linear algebra shared by the preconditioners (float64 internally, batched).

Gram matrices of LoRA factors are singular at vanilla initialization (``B = 0``) and can be
ill-conditioned later. Every inverse here is a damped pseudo-inverse: ``(M + delta I)^+`` with
eigenvalues below ``rcond * lambda_max`` treated as zero. So ``B = 0`` gives ``(B^T B)^+ = 0``
(the ``A`` direction is dropped for that step, as the projection ``P_B = 0`` says), never NaN.

Everything accepts a batch ``(..., r, r)``; ``grouped`` runs one batched call per group of
same-shaped matrices, so a model's 100 layers cost one ``eigh``, not 100.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

RCOND = 1e-6
"""Relative eigenvalue cut-off: a float32 Gram matrix carries about 1e-7 relative error."""


def _eigh(M: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    M = M.double()
    M = 0.5 * (M + M.mT)
    if delta:
        M = M + delta * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return torch.linalg.eigh(M)


def _keep(L: torch.Tensor, rcond: float, dims: int = 1) -> torch.Tensor:
    """Entries above ``rcond`` times the largest of their matrix (last ``dims`` dims); none if it is <= 0."""
    top = L.flatten(-dims).amax(-1)
    for _ in range(dims):
        top = top.unsqueeze(-1)
    return (L > rcond * top.clamp(min=0)) & (top > 0)


def psd_pinv(M: torch.Tensor, delta: float = 0.0, rcond: float = RCOND) -> torch.Tensor:
    """``(M + delta I)^+`` of symmetric PSD ``M (..., r, r)``, in ``M``'s dtype."""
    L, Q = _eigh(M, delta)
    keep = _keep(L, rcond)
    inv = torch.where(keep, 1.0 / torch.where(keep, L, torch.ones_like(L)), torch.zeros_like(L))
    return ((Q * inv.unsqueeze(-2)) @ Q.mT).to(M.dtype)


def sylvester_psd(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor, delta: float = 0.0,
                  rcond: float = RCOND) -> torch.Tensor:
    """Solve ``(P + delta I) X + X (Q + delta I) = C`` for symmetric PSD ``P``, ``Q`` (batched).

    Through both eigendecompositions, ``X = U [(U^T C V) / (p_i + q_j)] V^T``; pairs with
    ``p_i + q_j <= rcond * max`` (both factors singular there) get 0, the minimum-norm solution.
    """
    p, U = _eigh(P, delta)
    q, V = _eigh(Q, delta)
    denom = p.unsqueeze(-1) + q.unsqueeze(-2)
    keep = _keep(denom, rcond, dims=2)
    core = (U.mT @ C.double() @ V) / torch.where(keep, denom, torch.ones_like(denom))
    return (U @ torch.where(keep, core, torch.zeros_like(core)) @ V.mT).to(C.dtype)


def grouped(fn: Callable[..., torch.Tensor], *columns: Sequence[torch.Tensor], **kw) -> list[torch.Tensor]:
    """``[fn(*row) for row in zip(*columns)]``, computed with one batched ``fn`` call per group of
    rows whose tensors share shapes, dtype and device."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(zip(*columns)):
        groups.setdefault(tuple((t.shape, t.dtype, t.device) for t in row), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(columns[0])
    for idx in groups.values():
        res = fn(*(torch.stack([col[i] for i in idx]) for col in columns), **kw)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out  # type: ignore[return-value]
