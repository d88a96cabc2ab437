"""HeteroLoRA: which modules get a LoRA, chosen under a budget by a zero-cost proxy.

Zhang, Zhang, Gao, Mullins, Constantinides, Zhao 2024, "Unlocking the Global Synergies in Low-Rank Adapters",
arXiv 2406.14956; HeteroLoRA is the paper's allocation method (authors' code: ``ZixiBenZhang/lora_global_synergies``,
``tools/realloc_lora_rank.py``, ``importance_testing/grad_norm.py``). Every candidate module is either on, at the
configured rank ``r``, or off (rank 0: no adapter); the modules with the highest proxy scores are switched on,
as many as the budget holds (the authors keep the top 25% of modules, ``turn_on_percentile = 0.25``).

Proxies, on the LoRA factors at their initialization (``A`` kaiming-uniform, ``B = 0``), from the task loss over
the init batches:

- ``grad_norm`` (default): ``||dL/dA||_F + ||dL/dB||_F``. At ``B = 0``, ``dL/dA = s B^T G = 0`` and
  ``dL/dB = s G A^T`` with ``G = dL/dW`` (the mean gradient of the frozen weight), so the score is
  ``s ||G A^T||_F`` for the ``A`` the layer is then initialized with (the same seeded draw).
- ``constant``: every score equal, ties broken by a seeded random order: the paper's random-allocation baseline.

SNIP (``sum |A ⊙ dA| + |B ⊙ dB|``) and SynFlow are identically 0 at ``B = 0`` (every term has a factor ``B`` or
``dL/dA``), so at initialization they reduce to the random baseline; they are not offered. Only the static
allocation is implemented (the paper's dynamic variant re-scores every fraction of an epoch and switches modules
on and off during training; not here).

In lowrank: ``LoRAConfig(init="heterolora", rank=r, rank_budget=k * r)`` switches on ``k`` of the targets (the
budget a multiple of ``r``); without ``rank_budget``, ``turn_on`` (default 0.25, the authors') of them. The
switched-on modules are initialized as vanilla LoRA (kaiming ``A``, ``B = 0``); the others stay plain base modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_initializer
from .base import InitResult, LayerContext, RankAllocation
from .budget import RankBudget
from .gradient import GradientInitializer, GradientOptions
from .kaiming import kaiming_A

PROXIES = ("grad_norm", "constant")


@register_initializer("heterolora")
class HeteroLoRA(GradientInitializer, RankAllocation):
    """HeteroLoRA (arXiv 2406.14956): modules switched on (rank r) or off (rank 0) by a zero-cost proxy."""

    offset = False

    @dataclass(frozen=True)
    class Options(GradientOptions):
        proxy: str = "grad_norm"
        """``grad_norm`` (``||dL/dA|| + ||dL/dB||`` at init) or ``constant`` (a seeded random choice)."""
        turn_on: float = 0.25
        """Without ``rank_budget``: the fraction of the targets switched on (at least one; the authors'
        ``turn_on_percentile``, 0.25)."""

        def __post_init__(self):
            super().__post_init__()
            if self.proxy not in PROXIES:
                raise ValueError(f"invalid proxy={self.proxy!r}: one of {PROXIES} (SNIP and SynFlow are 0 at B = 0)")
            if isinstance(self.turn_on, bool) or not isinstance(self.turn_on, (int, float)) or not 0 < self.turn_on <= 1:
                raise ValueError(f"invalid turn_on={self.turn_on!r}: a fraction in (0, 1]")

    def allocates(self) -> bool:
        return True  # always chooses which modules are on

    def default_budget(self, ranks) -> int:
        r = max(set(ranks), key=list(ranks).count)
        return max(1, round(self.options.turn_on * len(ranks))) * r

    def min_rank(self, ctx: LayerContext) -> int:
        return 0

    def max_rank(self, ctx: LayerContext) -> int:
        return ctx.rank

    def check_budget(self, budget: RankBudget) -> None:
        on = [n for n, lo in budget.lo.items() if lo > 0]
        if on:
            raise ValueError(f"heterolora switches modules off (rank 0), but rank_min is {budget.lo[on[0]]}: pass "
                             "LoRAConfig(rank_min=0) or leave rank_min unset")
        sizes = set(budget.hi.values())
        if len(sizes) == 1 and budget.total % next(iter(sizes)):
            r = next(iter(sizes))
            raise ValueError(f"heterolora switches whole modules on at rank {r}: rank_budget={budget.total} is not a "
                             f"multiple of {r}; use {budget.total // r * r} or {(budget.total // r + 1) * r}")

    def scores(self, contexts) -> dict[str, float]:
        """The proxy per layer (``grad_norm``: ``s ||G A^T||_F``)."""
        if self.options.proxy == "constant":
            return {c.name: 0.0 for c in contexts}
        out = {}
        for c in contexts:
            A = kaiming_A(c).double()
            out[c.name] = c.scaling * float(torch.linalg.matrix_norm(c.gradient().double().to(A.device) @ A.T))
        return out

    def allocate(self, contexts, budget: RankBudget) -> dict[str, int]:
        contexts = list(contexts)
        score = self.scores(contexts)
        gen = torch.Generator().manual_seed(int(contexts[0].seed) if contexts else 0)
        tie = torch.randperm(len(contexts), generator=gen).tolist()  # seeded random tie-break (as the authors')
        order = sorted(range(len(contexts)), key=lambda i: (-score[contexts[i].name], tie[i]))
        ranks, left = {c.name: 0 for c in contexts}, budget.total
        for i in order:
            c = contexts[i]
            if budget.hi[c.name] <= left:
                ranks[c.name] = budget.hi[c.name]
                left -= budget.hi[c.name]
        if left:
            raise ValueError(f"heterolora: rank_budget={budget.total} cannot be met by whole modules of ranks "
                             f"{sorted(set(budget.hi.values()))}; {left} left over")
        return ranks

    def init_layer(self, ctx: LayerContext) -> InitResult:
        return InitResult(A=kaiming_A(ctx).to(ctx.device), B=ctx.zeros(ctx.m, ctx.rank))
