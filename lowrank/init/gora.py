"""GoRA: Gradient-driven Adaptive Low Rank Adaptation.

He et al. 2025, arXiv 2502.12171 (NeurIPS'25). From the mean gradient ``G`` of each target layer at
initialization (``lowrank.init.gradient``):

1. Importance ``I_l = mean_ij |W0 ⊙ G|`` (the paper's element-wise sensitivity), normalized
   ``a_l = I_l / sum_k I_k``.
2. Ranks: ``r_l`` proportional to ``a_l / sqrt(d_out + d_in)`` (the paper budgets parameters, a layer of
   rank ``r`` costing ``sqrt(d_out + d_in) r``), within ``[rank_min_factor r, rank_max_factor r]``
   (the paper: 4 and 32 for ``r = 8``), under the budget.
3. ``A`` kaiming-uniform ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` (``(r_l, d_in)``), and ``B`` the least-squares
   fit of the negative gradient through ``A``:

       B = -xi G A^T (A A^T)^{-1}       xi = gamma sqrt(d_in) / alpha

   so with rsLoRA (``s = alpha / sqrt(r_l)``, the paper's) ``s B A = -gamma sqrt(d_in / r_l) G P_A``, ``P_A``
   the projection onto the row space of ``A``: the init is a step along the gradient's projection.
   The base weight is not offset: the output changes at step 0 (as in the paper).

Where lowrank differs:
- The budget is ``LoRAConfig.rank_budget`` (default ``r`` times the number of targets), the *sum of ranks*,
  met exactly (water-filling, then largest remainder); the paper rounds ``b a_l / sqrt(d_out + d_in)`` with
  ``b = r sum_l sqrt(d_out + d_in)`` and clips, so its total drifts. With equal layer shapes the two give the
  same proportions.
- The authors' code (``hhnqqq/MyTransformers``, which LoRAFactory, arXiv 2601.22708, is built from) fits
  ``+G`` (no minus sign), budgets ``(d_out + d_in) r`` by default, floors instead of rounding, and scales
  importance as ``||W0 ⊙ G||_F`` unless a flag selects the mean; lowrank follows the paper (``-G``, ``sqrt``,
  mean), since a step along ``+G`` increases the loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..weights import weight_view
from ..registry import register_initializer
from .base import InitResult, LayerContext, RankAllocation
from .budget import RankBudget, allocate_proportional
from .gradient import GradientInitializer, GradientOptions


def importance(weight: torch.Tensor, gradient: torch.Tensor) -> float:
    """``mean |W0 ⊙ G|`` in float64."""
    return (weight.double() * gradient.double()).abs().mean().item()


@register_initializer("gora")
class GoRA(GradientInitializer, RankAllocation):
    """GoRA (arXiv 2502.12171): ranks by gradient importance, B the least-squares fit of -G through random A."""

    offset = False

    preserves_output = False

    @dataclass(frozen=True)
    class Options(GradientOptions):
        gamma: float = 5e-2
        """Step size of the initial fit: ``s B A = -gamma sqrt(d_in / r) G P_A`` under rsLoRA."""
        rank_min_factor: float = 0.5
        """Smallest rank ``round(rank_min_factor r)`` (paper: 4 for r = 8)."""
        rank_max_factor: float = 4.0
        """Largest rank ``round(rank_max_factor r)`` (paper: 32 for r = 8)."""
        allocate_ranks: bool = True
        """Allocate ranks by importance (False: the config's ranks, only the initialization)."""

        def __post_init__(self):
            super().__post_init__()
            for key in ("gamma", "rank_min_factor", "rank_max_factor"):
                v = getattr(self, key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                    raise ValueError(f"invalid {key}={v!r}: must be a finite number > 0")
            if self.rank_min_factor > self.rank_max_factor:
                raise ValueError(f"invalid rank_min_factor={self.rank_min_factor} > rank_max_factor="
                                 f"{self.rank_max_factor}")

    _warned_scaling = False

    def allocates(self) -> bool:
        return self.options.allocate_ranks

    def min_rank(self, ctx: LayerContext) -> int:
        return max(1, round(self.options.rank_min_factor * ctx.rank))

    def max_rank(self, ctx: LayerContext) -> int:
        return max(1, min(round(self.options.rank_max_factor * ctx.rank), ctx.m, ctx.n))

    def check_layer(self, ctx: LayerContext) -> None:
        if not ctx.rslora and not self._warned_scaling:
            self._warned_scaling = True
            warnings.warn("gora is defined with rsLoRA scaling (s = alpha / sqrt(r)); this layer's scale is "
                          f"{ctx.scaling:.4g} = alpha / r. Pass scaling='rslora' to follow the paper.", stacklevel=4)

    def allocate(self, contexts, budget: RankBudget) -> dict[str, int]:
        imp = {c.name: importance(weight_view(c.module).detach(), c.gradient()) for c in contexts}  # no cached copies
        total = sum(imp.values())
        if not total > 0:
            raise ValueError("gora: every target layer has zero importance mean|W0 * G| (a zero gradient); check "
                             "the data and loss_fn")
        return allocate_proportional({c.name: imp[c.name] / total / math.sqrt(c.m + c.n) for c in contexts}, budget)

    def init_layer(self, ctx: LayerContext) -> InitResult:
        r, n = ctx.rank, ctx.n
        A = ((2.0 * ctx.rand(r, n) - 1.0) / math.sqrt(n)).double()  # kaiming-uniform, (r, n)
        xi = self.options.gamma * math.sqrt(n) / ctx.alpha
        G = ctx.gradient().to(A.device).double()
        B = -xi * torch.linalg.solve(A @ A.T, A @ G.T).T  # G A^T (A A^T)^{-1}, (m, r)
        return InitResult(A=A.float().to(ctx.device), B=B.float().to(ctx.device), offset=False)
