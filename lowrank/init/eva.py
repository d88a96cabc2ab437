"""EVA: Explained Variance Adaptation.

Paulus, Gauch, Hochreiter et al. 2024, arXiv 2410.07170. For a layer with input rows ``X (N, d_in)``
(all token rows of the data, padding excluded), centred ``X_c = X - 1 mu^T`` (the paper computes an
incremental PCA, which centres), with ``X_c = U S V^T``:

    A = V_r^T        (r, d_in): the top-r right-singular vectors (``whiten``: row i divided by sqrt(S_i))
    B = 0            (d_out, r): the output is unchanged, the base is not offset

Rank redistribution (``rho > 1``): each layer offers its first ``round(rho r)`` components, scored by
their explained-variance ratio ``S_i^2 / sum_j S_j^2`` (over all of the layer's components); the
budget (default ``r`` times the number of targets, or ``LoRAConfig.rank_budget``) goes to the
highest-scoring components overall, each layer keeping at least ``rank_min``. With ``adjust_alpha``
a layer allocated ``r'`` gets ``alpha' = alpha r' / r`` (the paper's and PEFT's rule): with standard
scaling its scale ``alpha' / r'`` stays ``alpha / r``; under rsLoRA it becomes ``alpha sqrt(r') / r``,
as in PEFT (``use_rslora``), so it grows with the allocated rank.

Where lowrank differs from PEFT's ``get_eva_state_dict`` (both checked in ``tests/test_eva.py``):
the singular vectors are exact (the eigendecomposition of the accumulated ``X_c^T X_c``, one pass,
no early stopping) where PEFT runs a randomized incremental PCA until the components stop moving
(cosine >= ``tau``), cycling over the data; PEFT also masks tokens whose ``labels`` are -100 and lets a
layer's rank fall to 0 (the layer is dropped), where lowrank keeps ``rank_min >= 1``. On the same
rows the subspaces agree (``experiments/bench_init.py --eva``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, LayerContext, RankAllocation
from .budget import RankBudget, allocate_greedy
from .gradient import DataInitializer, DataOptions


def sign_fixed(V: torch.Tensor) -> torch.Tensor:
    """Columns of ``V`` with signs fixed so each column's largest-magnitude entry is positive (sklearn's
    ``svd_flip`` convention, as PEFT's incremental PCA uses): deterministic, comparable factors."""
    idx = V.abs().argmax(dim=0)
    signs = torch.sign(V[idx, torch.arange(V.shape[1], device=V.device)])
    return V * torch.where(signs == 0, torch.ones_like(signs), signs)


@register_initializer("eva")
class EVA(DataInitializer, RankAllocation):
    """EVA (arXiv 2410.07170): A from the top right-singular vectors of the layer inputs, B = 0."""

    offset = False

    needs = ("input_svd",)

    @dataclass(frozen=True)
    class Options(DataOptions):
        rho: float = 2.0
        """Each layer offers ``round(rho r)`` components to the redistribution (1: fixed ranks)."""
        centred: bool = True
        """Singular vectors of the centred inputs (PCA, the paper's and PEFT's) or of the raw inputs."""
        whiten: bool = False
        """Divide row ``i`` of ``A`` by ``sqrt(S_i)``."""
        adjust_alpha: bool = True
        """Keep each layer's scale when its rank changes: ``alpha' = alpha r' / r``."""

        def __post_init__(self):
            super().__post_init__()
            if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not self.rho >= 1:
                raise ValueError(f"invalid rho={self.rho!r}: must be a number >= 1 (1: no redistribution)")

    def allocates(self) -> bool:
        return self.options.rho > 1

    def max_rank(self, ctx: LayerContext) -> int:
        return min(round(self.options.rho * ctx.rank), ctx.m, ctx.n)

    def scale_alpha(self, alpha: float, rank: int, allocated: int) -> float:
        return alpha * allocated / rank if self.options.adjust_alpha else alpha

    def _check_rows(self, ctx: LayerContext, rank: int) -> None:
        rows = int(ctx.stat("rows"))
        usable = rows - 1 if self.options.centred else rows  # centring removes one dimension
        if usable < rank:
            raise ValueError(f"eva: layer {ctx.name!r} saw {rows} input rows, but rank {rank} needs at least "
                             f"{rank + (rows - usable)} (the {'centred ' if self.options.centred else ''}inputs have "
                             f"rank <= {max(usable, 0)}); pass more data (init_options['num_batches']) or lower the rank")

    def allocate(self, contexts, budget: RankBudget) -> dict[str, int]:
        scores = {}
        for ctx in contexts:
            S, _ = ctx.input_svd(centred=self.options.centred, vectors=False)
            var = S.double() ** 2
            scores[ctx.name] = var / var.sum().clamp_min(torch.finfo(torch.float64).tiny)
            self._check_rows(ctx, budget.lo[ctx.name])
        ranks = allocate_greedy(scores, budget)
        for ctx in contexts:
            self._check_rows(ctx, ranks[ctx.name])
        return ranks

    def init_layer(self, ctx: LayerContext) -> InitResult:
        o, r = self.options, ctx.rank
        self._check_rows(ctx, r)
        S, V = ctx.input_svd(centred=o.centred, k=r)
        A = sign_fixed(V).T.contiguous()  # (r, n), orthonormal rows
        if o.whiten:
            if not S[r - 1] > S[0] * 1e-3:  # below that, S^2 is within the float32 sums' rounding of S_0^2
                raise ValueError(f"eva: layer {ctx.name!r} has input singular values down to {S[r - 1].item():.3g} (top "
                                 f"{S[0].item():.3g}) among its top {r}: whitening would divide by ~0. Use whiten=False, "
                                 "a lower rank, or more varied data")
            A = A / S[:r, None].sqrt()
        return InitResult(A=A.to(ctx.device), B=ctx.zeros(ctx.m, r))
