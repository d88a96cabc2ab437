"""XGBLoRA, eXtreme Gradient Boosting LoRA (Zhang et al. 2024, arXiv 2410.19694).

Boosting with very weak learners: a fixed budget of ``K`` optimizer steps is cut into ``T = K / kappa`` rounds;
round ``t`` trains a fresh rank-1 LoRA "booster" on ``L_s`` layers drawn at random (the others take no update that
round) for ``kappa`` steps on the current model, then merges it, ``W_t = W_{t-1} + B_t A_t`` (Eq. 8, the boosting
rate ``alpha_t = 1``). Plain LoRA is the one-round, never-merged case.

Here: a round is a link (``links`` rounds of equal length, or ``link_steps = kappa``); ``layers`` blocks are drawn
uniformly without replacement each round (a block: the adapted layers that share a name up to their first numeric
component, ``model.layers.7.``; a layer outside any numbered block is a block of its own), every adapted layer
of a drawn block gets the booster; the booster starts from the initializer (``B = 0``: the output is unchanged at
each round's start), the optimizer's state is reset per round. Defaults: rank 1 (the paper's best; the adapters
must be injected at this rank), ``layers = 11/32`` of the blocks (the paper's best ``L_s = 11`` of LLaMA-3-8B's
32), 20 rounds. Not implemented: the norm penalties on ``A`` and ``B`` of the booster objective (Eq. 7), which
the paper's text also says it does without; the paper's ``kappa`` is lowrank's choice (``links``), not the
paper's number (not verified here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..registry import register_chain
from .base import Chain, ChainOptions, Link


def blocks(layers: list[str]) -> list[list[str]]:
    """The adapted layers grouped by block (the name up to its first numeric component), in model order."""
    groups: dict[str, list[str]] = {}
    for name in layers:
        m = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return list(groups.values())


@register_chain("xgblora")
class XGBLoRA(Chain):
    """XGBLoRA (arXiv 2410.19694): rounds of a rank-1 booster on randomly drawn layers, each merged into the base."""

    default_links = 20
    reinit_first = True
    freezes_factors = True

    @dataclass(frozen=True)
    class Options(ChainOptions):
        layers: float = 11 / 32
        """Blocks drawn per round: a fraction of the blocks in ``(0, 1]`` (at least one), or a count ``>= 1``
        given as an integer."""
        rank: int = 1
        """The boosters' rank, checked against the adapters' (inject at this rank)."""

        def __post_init__(self):
            super().__post_init__()
            v = self.layers
            ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)
            if not ok:
                raise ValueError(f"invalid layers={v!r}: a fraction in (0, 1] or an integer count >= 1")
            if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
                raise ValueError(f"invalid rank={self.rank!r}: a positive integer (the paper's boosters: 1)")

    def check(self, layers) -> None:
        for name, layer in layers.items():
            if layer.rank != self.options.rank:
                raise ValueError(f"xgblora trains rank-{self.options.rank} boosters, but layer {name!r} has rank "
                                 f"{layer.rank}: inject with rank={self.options.rank} (or set the chain's rank option)")

    def drawn(self, n_blocks: int) -> int:
        v = self.options.layers
        return min(n_blocks, v) if isinstance(v, int) else max(1, min(n_blocks, round(v * n_blocks)))

    def link(self, index, layers, generator) -> Link:
        groups = blocks(layers)
        pick = torch.randperm(len(groups), generator=generator)[: self.drawn(len(groups))].tolist()
        return Link(active=frozenset(n for i in sorted(pick) for n in groups[i]))


