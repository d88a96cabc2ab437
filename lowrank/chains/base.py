"""``Chain``: the fourth plug-in kind, a training-time procedure over links of low-rank training.

An initializer decides where the factors start, an adapter how they act, a preconditioner how they move; a chain
decides *when a link ends and what happens then*: the finished link's update ``s B A`` is merged into the base,
and a new link starts from new factors (any registered initializer, or the chain's own draw), with some factors
frozen, on some layers, with the optimizer's state reset or kept. COLA (arXiv 2401.04151), RAC-LoRA (arXiv
2410.08305) and XGBLoRA (arXiv 2410.19694) are chains; :class:`lowrank.chains.ChainRun` runs any of them
beside a training loop (``run.step(optimizer)`` after each optimizer step).

A chain is one file: a subclass with an ``Options`` dataclass (derived from :class:`ChainOptions`), registered
with ``@lowrank.register_chain("name")``, that implements :meth:`Chain.link` (and, for factors it draws itself,
:meth:`Chain.init_link`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._options import build_options
from ..init.base import InitResult, LayerContext

FACTORS = ("A", "B")


@dataclass(frozen=True)
class ChainOptions:
    """When links end. Give ``links`` (the run split into that many links of equal length) or ``link_steps``
    (a link every that many optimizer steps; the last link takes the rest), not both."""

    links: int | None = None
    """Number of links over the run (the chain's default when neither is given)."""
    link_steps: int | None = None
    """Optimizer steps per link."""
    init: str | None = None
    """The initializer of every new link's factors (``lowrank.list_initializers()``, e.g. ``"lora_ga"`` for links
    re-aligned with the gradient of the merged model); ``None``: the one the model was injected with. A chain
    that draws its own factors (RAC-LoRA, XGBLoRA's inactive layers) ignores it where it does."""
    init_options: dict[str, Any] = field(default_factory=dict)
    """Options of ``init`` (as ``LoRAConfig.init_options``); ``None`` init: the injected config's."""
    reset_optimizer: bool = True
    """At each knot, drop the optimizer's state of the adapter factors (Adam moments and step counts; a
    ``PreconditionedOptimizer``'s preconditioner state too), as for a newly built optimizer."""

    def __post_init__(self):
        for key in ("links", "link_steps"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"invalid {key}={v!r}: must be a positive integer (or None)")
        if self.links is not None and self.link_steps is not None:
            raise ValueError(f"give links ({self.links}) or link_steps ({self.link_steps}), not both")
        if self.init is not None and not isinstance(self.init, str):
            raise ValueError(f"invalid init={self.init!r}: a registered initializer name (or None)")
        if not isinstance(self.init_options, dict):
            raise ValueError(f"invalid init_options={self.init_options!r}: must be a mapping")
        if not isinstance(self.reset_optimizer, bool):
            raise ValueError(f"invalid reset_optimizer={self.reset_optimizer!r}: true or false")


@dataclass(frozen=True)
class Link:
    """What one link trains: ``active`` layers (``None``: every adapted layer; the others hold ``A = B = 0``,
    frozen, for the link) and the factors ``train`` of each active layer (the others frozen as drawn)."""

    active: frozenset[str] | None = None
    train: tuple[str, ...] = FACTORS

    def __post_init__(self):
        if not self.train or any(f not in FACTORS for f in self.train):
            raise ValueError(f"a link trains some of {FACTORS}, got {self.train!r}")


class Chain(ABC):
    """Base class of chains: ``knots`` (when links end; default from ``links`` / ``link_steps``) and ``link`` (what
    link ``index`` trains); ``init_link`` draws a layer's factors where the chain has its own rule."""

    Options = ChainOptions
    default_links: ClassVar[int] = 3
    """Links when neither ``links`` nor ``link_steps`` is given."""
    reinit_first: ClassVar[bool] = False
    """Whether link 0 starts from the chain's own factors (RAC-LoRA's sketch) instead of the injected ones."""
    registry_name: ClassVar[str] = "?"

    def __init__(self, **options: Any):
        self.options = build_options(self.Options, options, "chain", self.registry_name)

    def knots(self, total_steps: int) -> list[int]:
        """The optimizer steps after which a link ends (merged, and the next one started): increasing, in
        ``1 .. total_steps - 1``. ``ValueError`` (naming the value) when a link would be empty."""
        o = self.options
        if o.link_steps is not None:
            if o.link_steps >= total_steps:
                raise ValueError(f"link_steps={o.link_steps} is not shorter than the run ({total_steps} steps): the "
                                 f"chain would never merge; use link_steps < {total_steps}")
            return list(range(o.link_steps, total_steps, o.link_steps))
        links = o.links if o.links is not None else self.default_links
        if links > total_steps:
            raise ValueError(f"links={links} is more than the run's {total_steps} steps: a link needs at least one "
                             f"step; use links <= {total_steps}")
        return [math.floor(total_steps * k / links) for k in range(1, links)]

    def check(self, layers: dict[str, Any]) -> None:
        """Raise ``ValueError`` (naming the layer, the value and the fix) when the adapted ``layers`` do not suit the
        chain; called before anything changes. ``layers``: ``{name: adapter}``, or ``{name: LayerSpec}`` before the
        injection (the runner's up-front checks): read ``rank``, ``alpha``, ``scaling`` only. Default: nothing."""

    @abstractmethod
    def link(self, index: int, layers: list[str], generator: torch.Generator) -> Link:
        """What link ``index`` (0 = the first) trains, among the adapted ``layers`` (dotted names, in model
        order); ``generator`` is seeded from the chain's seed and ``index``."""

    def init_link(self, ctx: LayerContext, link: Link) -> InitResult | None:
        """A new link's factors for the layer of ``ctx`` (``ctx.generator`` seeded per layer and link), or
        ``None`` for the chain's initializer (``Options.init``)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
