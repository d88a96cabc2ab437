"""Truncated SVD for initializers: exact, or randomized (block Krylov) with a seeded generator.

``torch.svd_lowrank`` draws from the global RNG (neither reproducible from a seed nor free of
side effects) and, as PEFT calls it for PiSSA (``q = r``), is far from the exact truncation
when the spectrum is flat, as in pretrained weights. The randomized method here is the
randomized block Krylov iteration (Musco & Musco 2015, arXiv 1504.05477, Alg. 2): with a
block of ``b`` Gaussian directions it builds ``[M W, (M M^T) M W, ..., (M M^T)^q M W]``
(each block re-orthonormalized), so the search space has ``b (q + 1)`` directions for the
cost of ``q`` subspace iterations; on MiniLM's weights it reaches a given accuracy about
twice as fast as subspace iteration (``experiments/bench_init.py``).
"""

from __future__ import annotations

import torch

SVD_METHODS = ("auto", "full", "randomized")
AUTO_FULL_MAX = 512
"""``method="auto"``: the exact SVD when ``min(m, n) <= AUTO_FULL_MAX`` (cheap there), else the randomized
one. On a random Llama (hidden 1024, intermediate 2816, 28 gradients, LoRA-GA r=8, one thread) the exact
SVDs took 22 s, the randomized ones 2.1 s at Krylov depth 4 (first step's excess over the Eckart-Young
floor: median 4e-11, max 2.9e-6) and 1.1 s at depth 2 (median 2.9e-6, max 9.8e-4), LoRA-GA's ``auto``
default (``experiments/bench_init.py --large``)."""


def top_svd(M: torch.Tensor, k: int, *, method: str = "full", oversample: int | None = None, niter: int = 8,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets of ``M (m, n)``: ``U (m, k)``, ``S (k,)`` descending, ``V (n, k)``.

    ``method="auto"``: exact up to ``min(m, n) = AUTO_FULL_MAX``, randomized beyond.

    ``method="randomized"``: block size ``b = min(k + oversample, min(m, n))`` (``oversample``
    defaults to ``k``, a block of ``2k``), Krylov depth ``niter``; the search space holds ``b (niter + 1) >= 2k``
    directions for ``niter >= 1``. Computed in float32 (float64 inputs stay float64).
    """
    if method not in SVD_METHODS:
        raise ValueError(f"invalid svd method {method!r}: must be one of {SVD_METHODS}")
    M = M if M.dtype == torch.float64 else M.float()
    m, n = M.shape
    if not 0 < k <= min(m, n):
        raise ValueError(f"cannot take {k} singular triplets of a {m} x {n} matrix")
    if method == "auto":
        method = "full" if min(m, n) <= AUTO_FULL_MAX else "randomized"
    if method == "full":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    b = min(k + (k if oversample is None else oversample), min(m, n))
    omega = torch.randn(n, b, generator=generator, dtype=M.dtype).to(M.device)  # (n, b)
    Y = torch.linalg.qr(M @ omega).Q  # (m, b)
    blocks = [Y]
    for _ in range(niter):
        Y = torch.linalg.qr(M @ (M.T @ Y)).Q  # next Krylov block, re-orthonormalized
        blocks.append(Y)
    Q = torch.linalg.qr(torch.cat(blocks, dim=1)).Q  # (m, <= b (niter + 1))
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)  # Q^T M = Ub S Vh
    return (Q @ Ub)[:, :k], S[:k], Vh[:k].T


def bottom_svd(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` smallest singular triplets (of the thin SVD) of ``M``: ``U (m, k)``, ``S (k,)``, ``V (n, k)``."""
    M = M if M.dtype == torch.float64 else M.float()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, -k:], S[-k:], Vh[-k:].T


def check_svd_options(svd: str, oversample: int | None, niter: int) -> None:
    """Validate the ``svd`` / ``oversample`` / ``niter`` options of an initializer."""
    if svd not in SVD_METHODS:
        raise ValueError(f"invalid svd={svd!r}: must be one of {SVD_METHODS}")
    if oversample is not None and (not isinstance(oversample, int) or isinstance(oversample, bool) or oversample < 0):
        raise ValueError(f"invalid oversample={oversample!r}: must be an int >= 0, or None (= the number of triplets)")
    if not isinstance(niter, int) or isinstance(niter, bool) or niter < 0:
        raise ValueError(f"invalid niter={niter!r}: must be an int >= 0")
