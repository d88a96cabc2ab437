"""The first SGD step of LoRA, exactly and to first order (``docs/theory.md``, section 1).

With ``grad_A = s B^T G`` and ``grad_B = s G A^T``, one SGD step ``A1 = A - lr grad_A``,
``B1 = B - lr grad_B`` changes the adapter's weight ``s B A`` by

    s B1 A1 - s B A = -lr s^2 (B B^T G + G A^T A) + lr^2 s^3 G A^T B^T G

Full fine-tuning would move ``W`` by ``-lr G``. LoRA-GA (arXiv 2407.05000) picks ``A``, ``B`` so
that the first-order part is ``-lr zeta G_2r``, the best rank-``2r`` approximation of that step.
"""

from __future__ import annotations

import torch


def _dtype(*ts: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for t in ts:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def factor_gradients(A: torch.Tensor, B: torch.Tensor, scaling: float, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_A, grad_B) = (s B^T G, s G A^T)`` for ``A (r, n)``, ``B (m, r)``, ``G (m, n)``."""
    return scaling * B.T @ G, scaling * G @ A.T


def first_step_direction(A: torch.Tensor, B: torch.Tensor, scaling: float, G: torch.Tensor) -> torch.Tensor:
    """``D = s^2 (B B^T G + G A^T A)``: the first-order step of ``s B A`` is ``-lr D``."""
    dt = _dtype(A, B, G)
    A, B, G = A.to(dt), B.to(dt), G.to(dt)
    return scaling ** 2 * (B @ (B.T @ G) + (G @ A.T) @ A)


def first_step_update(A: torch.Tensor, B: torch.Tensor, scaling: float, G: torch.Tensor, lr: float,
                      exact: bool = True) -> torch.Tensor:
    """The change of ``s B A`` after one SGD step with learning rate ``lr`` at full-weight gradient ``G``.

    ``exact=True``: ``s B1 A1 - s B A`` from the stepped factors (first- and second-order terms);
    ``exact=False``: the first-order part ``-lr s^2 (B B^T G + G A^T A)``.
    Shapes: ``A (r, n)``, ``B (m, r)``, ``G (m, n)``; computed in at least float32.
    """
    if A.shape[0] != B.shape[1] or B.shape[0] != G.shape[0] or A.shape[1] != G.shape[1]:
        raise ValueError(f"shapes do not fit: A {tuple(A.shape)} must be (r, n), B {tuple(B.shape)} (m, r), "
                         f"G {tuple(G.shape)} (m, n)")
    if not exact:
        return -lr * first_step_direction(A, B, scaling, G)
    dt = _dtype(A, B, G)
    A, B, G = A.to(dt), B.to(dt), G.to(dt)
    gA, gB = factor_gradients(A, B, scaling, G)
    A1, B1 = A - lr * gA, B - lr * gB
    return scaling * (B1 @ A1 - B @ A)
