"""``PreconditionedOptimizer``: a preconditioner in front of any torch optimizer.

    opt = lowrank.optim.PreconditionedOptimizer(model, base="adamw", preconditioner="riemannian",
                                                lr=1e-3, weight_decay=0.01)
    loss.backward(); opt.step(); opt.zero_grad()

Each step: for every adapted layer, ``(A.grad, B.grad)`` are replaced by the preconditioner's
directions (computed in float32, float64 for float64 adapters), then the base optimizer steps.
Other trainable parameters (a classifier head) pass through untouched. Param groups, in order:
the ``A`` factors (``lr * mult_A``), the ``B`` factors (``lr * mult_B``), the rest (``lr``);
each group carries a ``"lowrank_role"`` key. It is a real ``torch.optim.Optimizer`` whose
``param_groups`` and ``state`` *are* the base optimizer's, so LR schedulers, gradient clipping
and ``transformers.Trainer(optimizers=(opt, sched))`` work unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..plan import adapted_layers
from ..registry import get_preconditioner, list_preconditioners
from .base import LayerGrads, Preconditioner
from .chain import Chain
from .state import flatten, read_only, split, unflatten

BASES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
}
STATE_VERSION = 1


def _base_class(base) -> type[torch.optim.Optimizer]:
    if isinstance(base, str):
        if base.lower() not in BASES:
            raise ValueError(f"unknown base optimizer {base!r}; use one of {sorted(BASES)} or a torch.optim.Optimizer "
                             "subclass")
        return BASES[base.lower()]
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base
    raise TypeError(f"base must be one of {sorted(BASES)} or a torch.optim.Optimizer subclass, got {base!r}")


def _resolve(preconditioner, options: dict[str, Any]) -> tuple[Preconditioner, dict[str, Any]]:
    """Build the preconditioner; options named by a string-given preconditioner's Options go to it."""
    items = preconditioner if isinstance(preconditioner, (list, tuple)) else [preconditioner]
    if not items:
        raise ValueError("preconditioner list is empty; use 'identity' for none")
    rest = dict(options)
    used: set[str] = set()
    built = []
    for item in items:
        if isinstance(item, str):
            cls = get_preconditioner(item)
            fields = {f.name for f in dataclasses.fields(cls.Options)}
            mine = {k: v for k, v in options.items() if k in fields}
            used |= mine.keys()
            built.append(cls(**mine))
        elif isinstance(item, Preconditioner):
            built.append(item)
        else:
            raise TypeError(f"preconditioner must be a registered name ({list_preconditioners()}), a Preconditioner "
                            f"instance or a list of them; got {item!r}")
    for k in used:
        rest.pop(k)
    return (built[0] if len(built) == 1 else Chain(built)), rest


class FactorPair(NamedTuple):
    """One adapter's trained ``A (r, d_in)``, ``B (d_out, r)`` and its scale."""

    A: nn.Parameter
    B: nn.Parameter
    scaling: float


class PreconditionedOptimizer(torch.optim.Optimizer):
    """Precondition the LoRA factors' gradients, then step a base torch optimizer.

    Args:
        model: a model with lowrank adapters (``lowrank.inject``).
        base: ``"sgd"``, ``"adamw"``, ``"adam"`` or a ``torch.optim.Optimizer`` subclass.
        preconditioner: a registered name (``lowrank.list_preconditioners()``), a ``Preconditioner``
            instance, or a list of them (applied in order, see ``lowrank.optim.chain``).
        lr: the base learning rate (LoRA+ multiplies it for ``B`` through the param groups).
        check_finite: raise ``FloatingPointError`` (naming the layer or parameter, nothing updated) when any
            gradient or its preconditioned direction is not finite; one fused reduction and one sync per step.
        **options: keys that are options of a preconditioner given by name go to it (e.g. ``delta``,
            ``ratio``); the rest go to the base optimizer (``weight_decay``, ``betas``, ``momentum``...).

    Param groups carry ``lowrank_role``: ``"A"`` and ``"B"`` (the factor pairs the preconditioner
    transforms), ``"adapter"`` (other adapter parameters, e.g. DoRA's magnitude, LoRA-XS's core, stepped
    by the base optimizer at ``lr``) and ``"other"`` (everything else trainable, e.g. a head).
    """

    def __init__(self, model: nn.Module, base: str | type[torch.optim.Optimizer] = "adamw",
                 preconditioner: str | Preconditioner | list = "identity", lr: float = 1e-3, *,
                 check_finite: bool = True, **options: Any):
        base_cls = _base_class(base)
        precond, base_options = _resolve(preconditioner, options)
        all_layers = list(adapted_layers(model))
        if not all_layers:
            raise ValueError("the model has no lowrank adapters; call lowrank.inject(model, config) first")
        for name, layer in all_layers:
            if layer.kind not in precond.adapter_kinds:
                raise ValueError(f"preconditioner {precond!r} cannot train layer {name!r}: its {layer.registry_name!r} "
                                 f"adapter is of kind {layer.kind!r}, the preconditioner supports "
                                 f"{list(precond.adapter_kinds)}; use preconditioner='identity' or another adapter")
        # the (A, B) pairs the preconditioner transforms, as the adapters declare them (Adapter.factors)
        layers = [(name, FactorPair(*layer.factors(), layer.scaling)) for name, layer in all_layers
                  if layer.factors() is not None]
        precond.note_base(base_cls)
        frozen_B = [name for name, layer in layers if not layer.B.requires_grad]  # an init that fixes B (MiCA)
        if frozen_B and (precond.transforms_gradients or not precond.trains_A):
            raise ValueError(f"layer {frozen_B[0]!r} keeps B fixed (its initializer freezes it, e.g. mica), but "
                             f"preconditioner {precond!r} " + ("trains no A either" if not precond.trains_A else
                             "transforms (grad_A, grad_B) together") + "; use preconditioner='identity' (or "
                             "'lora_plus') with this initializer")
        mult_A, mult_B = precond.lr_multipliers()
        ab = {id(p) for _, layer in layers for p in (layer.A, layer.B)}
        extra = {id(p) for _, layer in all_layers for p in layer.adapter_parameters().values() if id(p) not in ab}
        named_others = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ab]
        groups = []
        if layers and precond.trains_A:
            groups.append({"params": [layer.A for _, layer in layers], "lr": lr * mult_A, "lowrank_role": "A"})
        trained_B = [layer.B for name, layer in layers if name not in frozen_B]
        if trained_B:
            groups.append({"params": trained_B, "lr": lr * mult_B, "lowrank_role": "B"})
        adapter_extra = [p for _, p in named_others if id(p) in extra]  # DoRA's magnitude, LoRA-XS's core
        if adapter_extra:
            groups.append({"params": adapter_extra, "lr": lr, "lowrank_role": "adapter"})
        others = [p for _, p in named_others if id(p) not in extra]
        if others:
            groups.append({"params": others, "lr": lr, "lowrank_role": "other"})
        try:
            self.base = base_cls(groups, lr=lr, **base_options)
        except TypeError as e:
            raise TypeError(f"{base_cls.__name__} rejected options {sorted(base_options)}: {e}; preconditioner options "
                            f"are those of {precond!r}") from e
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups, self.state = self.base.param_groups, self.base.state
        self.preconditioner = precond
        self.check_finite = check_finite
        self.layers = layers
        self.others = named_others
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.layer_state = {name: precond.init_state(layer.A.detach(), layer.B.detach()) for name, layer in layers}
        self.steps = 0
        self._frozen_A = []
        if not precond.trains_A:  # LoRA-FA: A is fixed, do not even compute its gradient
            for _, layer in layers:
                if layer.A.requires_grad:
                    self._frozen_A.append(layer.A)
                layer.A.requires_grad_(False)
                layer.A.grad = None

    def reset_state(self, params) -> None:
        """Forget what this optimizer holds for ``params``: the base optimizer's state (Adam's moments and step
        count) and the preconditioner's state of the layers they belong to (rebuilt from the current factors), as
        for a newly built optimizer. A chain (``lowrank.chains``) calls it when a link ends."""
        ids = {id(p) for p in params}
        for p in [p for p in self.base.state if id(p) in ids]:
            del self.base.state[p]
        for name, layer in self.layers:
            if id(layer.A) in ids or id(layer.B) in ids:
                self.layer_state[name] = self.preconditioner.init_state(layer.A.detach(), layer.B.detach())

    def restore_requires_grad(self) -> None:
        """Undo what building this optimizer did to the model: a preconditioner that fixes ``A`` (LoRA-FA)
        turns ``A.requires_grad`` off so no gradient is computed for it; this turns it back on (e.g.
        before training the same model with another optimizer)."""
        for A in self._frozen_A:
            A.requires_grad_(True)
        self._frozen_A = []

    def _directions(self) -> tuple[list[tuple[str, Any, Any, Any, Any]], dict[str, Any]]:
        """``(name, grad_A, grad_B, new grad_A, new grad_B)`` per layer that has gradients (compute dtype), and the
        layers' next preconditioner states (kept by :meth:`step` only once the step is accepted)."""
        trains_A = self.preconditioner.trains_A
        if not self.preconditioner.transforms_gradients:  # nothing to compute: only the finite check sees them
            return [(name, gA, gB, gA, gB) for name, layer in self.layers for gA, gB in
                    [(layer.A.grad if trains_A else None, layer.B.grad)] if gA is not None or gB is not None], {}
        names, items = [], []
        for name, layer in self.layers:
            A, B = layer.A, layer.B
            gA = A.grad if trains_A else None
            gB = B.grad
            if gB is None and gA is None:
                continue  # the layer took no part in this loss
            dt = torch.promote_types(B.dtype, torch.float32)
            cA = None if not trains_A else (torch.zeros_like(A, dtype=dt) if gA is None else gA.to(dt))
            cB = torch.zeros_like(B, dtype=dt) if gB is None else gB.to(dt)
            names.append(name)
            items.append(LayerGrads(cA, cB, A.detach().to(dt), B.detach().to(dt), layer.scaling,
                                    read_only(self.layer_state[name])))
        new = [split(out) for out in self.preconditioner.update_many(items)]
        return ([(n, it.grad_A, it.grad_B, nA, nB) for n, it, (nA, nB, _) in zip(names, items, new)],
                {n: st for n, (_, _, st) in zip(names, new) if st is not None})

    def _check_finite(self, dirs) -> None:
        # One fused norm per step over every gradient the step will use, adapters and the rest (a head):
        # a non-finite entry makes its norm non-finite; an overflowing norm of finite entries is told
        # apart by the slow path below, which then finds nothing and returns.
        tensors = list({id(t): t for _, *ts in dirs for t in ts if t is not None}.values())
        tensors += [p.grad for _, p in self.others if p.grad is not None]
        if not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
            return
        for name, p in self.others:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                raise FloatingPointError(
                    f"non-finite gradient of parameter {name!r} at step {self.steps}; no parameter was updated. "
                    "Lower the learning rate, clip gradients, or check the loss")
        for name, cA, cB, nA, nB in dirs:
            for what, t in (("grad_A", cA), ("grad_B", cB), ("preconditioned grad_A", nA),
                            ("preconditioned grad_B", nB)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(
                        f"non-finite {what} in layer {name!r} at step {self.steps} ({self.preconditioner!r}); no "
                        "parameter was updated. Lower the learning rate, clip gradients, or check the loss")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Precondition the adapters' gradients in place, then step the base optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dirs, states = self._directions()
        if self.check_finite:
            self._check_finite(dirs)
        self.layer_state.update(states)  # the step is accepted: the preconditioner's next state is kept
        by_name = dict(self.layers)
        for name, cA, cB, nA, nB in dirs:
            layer = by_name[name]
            for param, computed, new in ((layer.A, cA, nA), (layer.B, cB, nB)):
                if new is None or new is computed and param.grad is computed:
                    continue  # unchanged (identity on a float32 grad): leave the tensor alone
                if param.grad is None:
                    param.grad = new.to(param.dtype)
                else:
                    param.grad.copy_(new)
        self.base.step()
        self.steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "base": self.base.state_dict(), "steps": self.steps,
                "preconditioner": repr(self.preconditioner),
                "layers": {name: flatten(st) for name, st in self.layer_state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("version") != STATE_VERSION:
            raise ValueError("not a PreconditionedOptimizer state_dict (missing or unknown 'version'); a plain "
                             "optimizer's state_dict goes to opt.base.load_state_dict")
        if state_dict["preconditioner"] != repr(self.preconditioner):
            raise ValueError(f"state_dict was saved with {state_dict['preconditioner']}, this optimizer uses "
                             f"{self.preconditioner!r}")
        if set(state_dict["layers"]) != set(self.layer_state):
            missing = sorted(set(self.layer_state) ^ set(state_dict["layers"]))
            raise ValueError(f"state_dict adapter layers differ from the model's, first mismatch: {missing[0]!r}")
        self._check_state_shapes(state_dict)
        self.base.load_state_dict(state_dict["base"])
        self.param_groups, self.state = self.base.param_groups, self.base.state
        self.layer_state = {name: unflatten(self.layer_state[name], st) for name, st in state_dict["layers"].items()}
        self.steps = int(state_dict["steps"])

    def _check_state_shapes(self, state_dict: dict[str, Any]) -> None:
        """Every saved tensor fits this optimizer's parameters and layers, checked before anything is loaded
        (so a state from another model, e.g. another rank, is an error and not a half-applied step)."""
        base = state_dict.get("base", {})
        params = [p for g in self.base.param_groups for p in g["params"]]
        saved_groups = base.get("param_groups", [])
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.base.param_groups]:
            raise ValueError(f"state_dict has param groups of sizes {[len(g['params']) for g in saved_groups]}, this "
                             f"optimizer {[len(g['params']) for g in self.base.param_groups]}: it was saved for another "
                             "model or preconditioner")
        index = {pid: i for i, pid in enumerate(p for g in saved_groups for p in g["params"])}
        for pid, st in base.get("state", {}).items():
            p = params[index[pid]] if pid in index else None
            for k, v in st.items():
                if p is not None and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(f"state_dict entry {k!r} of parameter {self.param_names.get(id(p), '?')!r} has "
                                     f"shape {tuple(v.shape)}, the parameter {tuple(p.shape)}: it was saved for a "
                                     "model with other ranks or layers; nothing was loaded")
        for name, st in state_dict["layers"].items():
            flat = flatten(self.layer_state[name])
            if set(st) != set(flat):
                raise ValueError(f"state_dict preconditioner state of layer {name!r} has keys {sorted(st)}, this "
                                 f"optimizer's {sorted(flat)}: it was saved for another preconditioner; nothing was "
                                 "loaded")
            for k, v in st.items():
                mine = flat[k]
                if not isinstance(v, torch.Tensor) or v.shape != mine.shape:
                    raise ValueError(f"state_dict preconditioner state {k!r} of layer {name!r} has shape "
                                     f"{tuple(getattr(v, 'shape', ()))} ({type(v).__name__}), this optimizer's "
                                     f"{tuple(mine.shape)}; nothing was loaded")

    def __repr__(self) -> str:
        return f"PreconditionedOptimizer({type(self.base).__name__}, {self.preconditioner!r}, {len(self.layers)} layers)"


def build_optimizer(model: nn.Module, name: str, **kw: Any) -> PreconditionedOptimizer:
    """``name`` is ``"<base>"`` or ``"<base>+<preconditioner>[+<preconditioner>...]"``, e.g. ``"adamw"``,
    ``"sgd+lora_pro"``, ``"adamw+lora_plus+riemannian"``; ``kw`` as for ``PreconditionedOptimizer``."""
    parts = [p.strip() for p in name.split("+")]
    if not parts[0] or parts[0].lower() not in BASES:
        raise ValueError(f"optimizer name {name!r} must start with a base optimizer, one of {sorted(BASES)} "
                         f"(e.g. 'adamw+riemannian'); preconditioners: {list_preconditioners()}")
    precs = parts[1:] or ["identity"]
    return PreconditionedOptimizer(model, base=parts[0].lower(), preconditioner=precs, **kw)
