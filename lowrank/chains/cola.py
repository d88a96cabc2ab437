"""COLA, Chain of LoRA (Xia, Qin, Hazan 2024, arXiv 2401.04151), Algorithm 1.

Training is cut at preset knots into links. Within a link a fresh LoRA ``(A, B)`` trains as usual; at a knot it
is merged into the frozen weights, ``W <- W + s B A`` ("tie a knot"), and a new LoRA starts from the
initializer ("extend the chain", ``B = 0`` for the default Kaiming/Gaussian ``A``, so the merged model's output is
unchanged), with the optimizer's state reset (the paper's Figure 1). The sum of the links' low-rank updates can
have rank up to ``r x links``: the Frank-Wolfe view of the paper, each link a low-rank step on the residual
problem added to ``W``.

Defaults: 3 links of equal length (the longest chain of the paper's ablation, its best), the optimizer's state
reset at each knot, the learning-rate schedule left to the caller (not restarted per link: the paper does not
say). ``init="lora_ga"`` re-aligns every new link with the gradient of the merged model (a combination that
exists in no other code base).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_chain
from .base import Chain, ChainOptions, Link


@register_chain("cola")
class COLA(Chain):
    """COLA (arXiv 2401.04151): links of LoRA, each merged into the base and restarted, the optimizer state reset.

    Every link trains ``(A, B)`` from the chain's initializer; see the module docstring."""

    default_links = 3

    @dataclass(frozen=True)
    class Options(ChainOptions):
        """COLA's options are the chain's own (``links`` / ``link_steps``, ``init``, ``reset_optimizer``)."""

    def link(self, index, layers, generator) -> Link:
        return Link()
