"""``ChainRun``: a chain (``lowrank.chains.Chain``) run beside a training loop.

    run = lowrank.start_chain(model, "cola", optimizer=opt, total_steps=300, links=3)
    for batch in batches:
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
        run.step()                  # at a knot: merge the link, start the next one, reset the optimizer's state

At a knot every adapted layer's finished link is folded into its base, ``W <- W + s B A``, and recorded in the
layer's offset record (``A0 <- [A0; A]``, ``B0 <- [B0, -B]``, so ``W = W0 - s B0 A0`` holds at rank ``R0 + r``:
:func:`lowrank.weights.extend_offset`). The next link's factors come from the chain's own draw or its
initializer, run on the merged model (a data-driven one makes its pass there); an offset initializer's factors are
folded into the record the same way. A chained model therefore stays one lowrank model: ``save_adapter`` /
``load_adapter`` rebuild it on the original base, and ``lowrank.peft.export`` writes it as one LoRA of rank
``r + R0`` (``r x (links + 1)`` for an offset initializer) that PEFT loads on the original base.

A knot is atomic: a failure (a data pass that fails, non-finite factors) puts back every weight, factor and record
it changed, bit for bit, and re-raises.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..adapters.base import Adapter
from ..weights import restore_weight
from ..init.base import InitResult, layer_seed
from ..init.driver import LayerSpec, check_result, collect_layers, context, init_layers
from ..plan import RECORD_ATTR, adapted_layers, unwrap
from ..quant import is_4bit
from ..registry import INITIALIZERS, get_chain, get_initializer
from ..sharding import is_dtensor
from ..weights import extend_offset
from .base import Chain, Link


def start_chain(model: nn.Module, chain: str | Chain, *, optimizer: torch.optim.Optimizer, total_steps: int,
                data: Iterable | None = None, loss_fn: Callable | None = None, **options: Any) -> "ChainRun":
    """Start ``chain`` (a registered name, ``lowrank.list_chains()``, with its ``options``, or a built
    :class:`Chain`) on an injected ``model`` trained by ``optimizer`` for ``total_steps`` optimizer steps; call
    ``run.step()`` after every optimizer step. ``data`` (and ``loss_fn``): batches for a data-driven link
    initializer's pass (e.g. ``init="lora_ga"``), reused at every knot."""
    if isinstance(chain, str):
        chain = get_chain(chain)(**options)
    elif options:
        raise TypeError(f"options {sorted(options)} given with a built chain {chain!r}; pass its name instead")
    return ChainRun(model, chain, optimizer=optimizer, total_steps=total_steps, data=data, loss_fn=loss_fn)


class ChainRun:
    """The state of one chain over one run: the knots, the current link (``link``, 0-based) and ``links`` (how many
    links have run, the current one included). Built by :func:`start_chain`."""

    def __init__(self, model: nn.Module, chain: Chain, *, optimizer: torch.optim.Optimizer, total_steps: int,
                 data: Iterable | None = None, loss_fn: Callable | None = None):
        self.model = model = unwrap(model)
        self.chain, self.optimizer, self.data, self.loss_fn = chain, optimizer, data, loss_fn
        if not (isinstance(total_steps, int) and not isinstance(total_steps, bool) and total_steps >= 1):
            raise ValueError(f"total_steps={total_steps!r}: must be a positive integer (the run's optimizer steps)")
        self.layers: dict[str, Adapter] = dict(adapted_layers(model))
        record = getattr(model, RECORD_ATTR, None)
        if not self.layers or record is None:
            raise ValueError(f"{type(model).__name__} has no lowrank adapters; call lowrank.inject(model, config) "
                             "before starting a chain")
        self._check_layers()
        chain.check(self.layers)
        config = record.config
        self.seed = config.seed
        o = chain.options
        name = o.init if o.init is not None else config.init
        init_options = o.init_options if o.init is not None else config.init_options
        self.initializer = get_initializer(name)(**init_options)
        self._frozen_by_init = INITIALIZERS.entry(name).capabilities["frozen"]
        self._check_initializer(name)
        self.knots = chain.knots(total_steps)
        self.total_steps = total_steps
        self.steps = 0
        self.link = 0
        self._check_optimizer()
        self._begin(0, restart=chain.reinit_first)

    # -- public -----------------------------------------------------------------------------------
    @property
    def links(self) -> int:
        """Links run so far, the current one included."""
        return self.link + 1

    def step(self) -> bool:
        """Count one optimizer step; at a knot, end the link (merge, start the next one, reset the optimizer's
        state of the factors if the chain says so). Returns whether a link ended."""
        self.steps += 1
        if self.steps > self.total_steps:
            raise RuntimeError(f"ChainRun.step called {self.steps} times for a run of total_steps="
                               f"{self.total_steps}; start the chain with the run's real number of optimizer steps")
        if self.steps not in self.knots:
            return False
        self._begin(self.link + 1, restart=True)
        return True

    # -- checks -----------------------------------------------------------------------------------
    def _check_layers(self) -> None:
        for name, layer in self.layers.items():
            if layer.factors() is None or type(layer).merged_weight is not Adapter.merged_weight:
                raise ValueError(f"layer {name!r} has a {layer.registry_name!r} adapter, whose update is not s B A "
                                 "added to the base: a chain merges links as W + s B A; use adapter='lora'")
            if not hasattr(layer, "set_factors"):
                raise ValueError(f"layer {name!r}: its {layer.registry_name!r} adapter cannot be re-initialized "
                                 "(no set_factors); use adapter='lora'")
            if layer.merged:
                raise ValueError(f"layer {name!r} is merged; call lowrank.unmerge(model) before starting a chain")
            if is_4bit(layer.base_layer):
                raise ValueError(f"layer {name!r} has a 4-bit base: merging a link would re-quantize it at every knot "
                                 "(its rounding error adding up link after link); dequantize the base "
                                 "(lowrank.quant) or train without a chain")
            if is_dtensor(layer.base_layer.weight):
                raise ValueError(f"layer {name!r} has an FSDP2-sharded base: chains are not supported on sharded "
                                 "bases yet (merging is written for them, but not tested across ranks)")

    def _check_initializer(self, name: str) -> None:
        init = self.initializer
        if callable(getattr(init, "allocate", None)):
            raise ValueError(f"initializer {name!r} chooses ranks; a chain keeps each layer's rank for every link: "
                             "use a fixed-rank initializer for the links (chain option init=...)")
        kinds = {layer.kind for layer in self.layers.values()}
        if not kinds <= set(init.adapter_kinds):
            raise ValueError(f"initializer {name!r} cannot initialize {sorted(kinds)} adapters")
        if init.uses_data and self.data is None:
            raise ValueError(f"the chain's link initializer {name!r} is data-driven: pass data=<batches> (and "
                             "loss_fn if model(**batch).loss is not the loss) to start_chain")
        for lname, layer in self.layers.items():
            init.check_layer(context(self._spec(lname, layer), self.seed))

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers behind ``self.optimizer`` (several stepped together; an accelerate wrapper unwrapped)."""
        out = []
        for o in getattr(self.optimizer, "optimizers", None) or [self.optimizer]:
            inner = getattr(o, "optimizer", None)
            out.append(inner if isinstance(inner, torch.optim.Optimizer) else o)
        return out

    def _check_optimizer(self) -> None:
        opts = self._optimizers()
        if not all(isinstance(o, torch.optim.Optimizer) for o in opts):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (the one stepping the adapters), got "
                            f"{type(self.optimizer).__name__}")
        params = {id(p) for _, layer in self.layers.items() for p in layer.factors()}
        held = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
        if not params & held:
            raise ValueError("the optimizer holds none of the adapters' factors; build it before starting the chain "
                             "(a factor frozen for the first link must still be in it, to train in later links)")
        precond = next((o.preconditioner for o in opts if hasattr(o, "preconditioner")), None)
        if precond is not None and getattr(self.chain, "freezes_factors", False) and precond.transforms_gradients:
            raise ValueError(f"chain {self.chain.registry_name!r} freezes factors within a link, but preconditioner "
                             f"{precond!r} transforms (grad_A, grad_B) together and would move the frozen one; use "
                             "preconditioner='identity' (or 'lora_plus')")

    def _spec(self, name: str, layer: Adapter) -> LayerSpec:
        return LayerSpec(name, layer.base_layer, layer.rank, layer.alpha, layer.scaling)

    # -- a knot ---------------------------------------------------------------------------------
    def _begin(self, index: int, restart: bool) -> None:
        names = list(self.layers)
        gen = torch.Generator().manual_seed(layer_seed(self.seed, f"chain link {index}"))
        link = self.chain.link(index, names, gen)
        if link.active is not None and not set(link.active) <= set(names):
            raise ValueError(f"chain {self.chain.registry_name!r} link {index} names layers that are not adapted: "
                             f"{sorted(set(link.active) - set(names))[:3]}")
        if restart:
            self._restart(index, link)
            self._reset_optimizer()
        self._set_trainable(link)
        self.link = index

    @torch.no_grad()
    def _restart(self, index: int, link: Link) -> None:
        saved = {n: (l.A.detach().clone(), l.B.detach().clone(), l.A0, l.B0) for n, l in self.layers.items()}
        olds: list[tuple[nn.Module, torch.Tensor]] = []
        try:
            for layer in self.layers.values():  # fold the finished link: W <- W + s B A (skipped when it is 0)
                if bool(layer.A.any()) and bool(layer.B.any()):
                    olds.append((layer.base_layer, extend_offset(layer, layer.A, -layer.B)))
                layer.A.zero_()
                layer.B.zero_()
            results = self._new_factors(index, link)
            for name, layer in self.layers.items():
                res = results[name]
                layer.set_factors(res.A, res.B)
                if res.offset:
                    olds.append((layer.base_layer, extend_offset(layer, *res.subtracted())))
        except BaseException:
            for module, old in reversed(olds):
                if old is not None:
                    restore_weight(module, old)
            for name, layer in self.layers.items():
                A, B, A0, B0 = saved[name]
                layer.set_factors(A, B)
                layer.A0, layer.B0 = A0, B0
            raise

    def _new_factors(self, index: int, link: Link) -> dict[str, InitResult]:
        seed = layer_seed(self.seed, f"chain link {index} factors")
        out: dict[str, InitResult] = {}
        pending = []
        for name, layer in self.layers.items():
            spec = self._spec(name, layer)
            if link.active is not None and name not in link.active:
                out[name] = InitResult(A=torch.zeros_like(layer.A), B=torch.zeros_like(layer.B))
                continue
            res = self.chain.init_link(context(spec, seed), link)
            if res is None:
                pending.append(spec)
            else:
                check_result(res, spec, f"chain {self.chain.registry_name}")
                out[name] = res
        if pending:
            stats = collect_layers(self.initializer, pending, model=self.model, data=self.data, loss_fn=self.loss_fn)
            _, results = init_layers(self.initializer, pending, stats, seed=seed)
            out.update({s.name: r for s, r in zip(pending, results)})
        return out

    def _set_trainable(self, link: Link) -> None:
        for name, layer in self.layers.items():
            active = link.active is None or name in link.active
            for key, p in zip(("A", "B"), layer.factors()):
                p.requires_grad_(active and key in link.train and key not in self._frozen_by_init)
                p.grad = None

    def _reset_optimizer(self) -> None:
        if not self.chain.options.reset_optimizer:
            return
        params = [p for layer in self.layers.values() for p in layer.factors()]
        for opt in self._optimizers():
            if hasattr(opt, "reset_state"):
                opt.reset_state(params)
            else:
                for p in params:
                    opt.state.pop(p, None)

    def __repr__(self) -> str:
        return (f"ChainRun({self.chain!r}, link {self.links} of {len(self.knots) + 1}, step {self.steps}/"
                f"{self.total_steps})")
