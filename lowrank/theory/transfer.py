"""Learning-rate transfer: predict each configuration's rate from what is measurable at initialization.

Given a reference configuration whose good rate ``lr_ref`` is known (searched), every rule below
measures one quantity ``q`` per configuration at initialization, with no training step, and
predicts ``lr = lr_ref * q_ref / q``. All rules look at the optimizer's first step per unit rate,
``-u`` (for Adam: ``u = g~ / (|g~| + eps)``, ``g~`` the gradient after the preconditioner and the
per-group rate multipliers), taken by the real optimizer on the mean gradient ``g`` of the data:

- ``"function"``: ``q = ||J u||``, the first-order change of the model's outputs (``J`` their
  Jacobian over the data): rates that move the function by the same amount in the first step.
- ``"loss"``: ``q = g . u``, the first-order decrease of the loss.
- ``"directional"``: ``q = (u^T H u) / (g . u)``, the inverse of the step that minimizes the quadratic
  model of the loss along ``u`` (an exact line search on the first step).
- ``"sharpness"`` / ``"sharpness_adam"``: ``q = |lambda_max|`` of ``H`` / of ``P^{-1/2} H P^{-1/2}``
  (``lowrank.theory.sharpness``): the edge-of-stability argument ``lr * lambda_max ~ const``.

Which rule predicts tuned rates best is measured, not assumed: ``docs/theory.md`` reports every
rule's error against searched rates on WordNet/MiniLM, and ``DEFAULT_RULE`` is the winner there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..config import LoRAConfig
from ..inject import default_loss, inject
from .sharpness import HessianOperator, _math_attention, _Preserved, mean_loss, sharpness, take_batches, trainable

RULES = ("function", "loss", "directional", "sharpness", "sharpness_adam")
DEFAULT_RULE = "function"


@dataclass(frozen=True)
class FullFineTune:
    """Full fine-tuning as a ``transfer_lr`` configuration: every parameter trains except ``frozen``
    modules (matched like ``LoRAConfig.trainable``: a module name or dotted suffix, e.g. a head
    trained at its own rate)."""

    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arm:
    """A configuration plus the optimizer that trains it (``transfer_lr(configs={label: Arm(...)})``)."""

    config: LoRAConfig | FullFineTune
    preconditioner: str = "identity"
    preconditioner_options: Mapping[str, Any] | None = None
    base: str = "adamw"


def _setup(model: nn.Module, arm: Arm, data: list, loss_fn: Callable) -> None:
    cfg = arm.config
    if isinstance(cfg, FullFineTune):
        from ..config import matches_targets

        frozen = {id(p) for name, mod in model.named_modules() if cfg.frozen and matches_targets(list(cfg.frozen), name)
                  for p in mod.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        return
    uses_data = cfg.make_initializer().uses_data
    inject(model, cfg, data=data if uses_data else None, loss_fn=loss_fn, progress=False)


def _optimizer(model: nn.Module, arm: Arm):
    if isinstance(arm.config, FullFineTune):
        if arm.preconditioner != "identity":
            raise ValueError("full fine-tuning has no adapters to precondition; use preconditioner='identity'")
        from ..optim.optimizer import _base_class

        return _base_class(arm.base)([p for p in model.parameters() if p.requires_grad], lr=1.0, weight_decay=0.0)
    from ..optim import PreconditionedOptimizer

    return PreconditionedOptimizer(model, base=arm.base, preconditioner=arm.preconditioner, lr=1.0, weight_decay=0.0,
                                   check_finite=True, **dict(arm.preconditioner_options or {}))


def _default_output(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError("the model's output has no .logits; pass output_fn=lambda model, batch: <output tensor>")
    return logits


def _jvp_norm(model: nn.Module, params: Sequence[nn.Parameter], u: Sequence[torch.Tensor], batches: Sequence[Any],
              output_fn: Callable) -> float:
    """RMS over all output entries of ``J u`` (double-backward trick: ``J u = d/dw [(J^T w) . u]``)."""
    total, count = 0.0, 0
    for b in batches:
        y = output_fn(model, b)
        w = torch.zeros_like(y, requires_grad=True)
        vjp = torch.autograd.grad(y, params, grad_outputs=w, create_graph=True, allow_unused=True)
        pairs = [(v, ui) for v, ui in zip(vjp, u) if v is not None and v.requires_grad]
        if pairs:
            (ju,) = torch.autograd.grad([v for v, _ in pairs], w, grad_outputs=[ui for _, ui in pairs])
            total += ju.double().square().sum().item()
        count += y.numel()
    return math.sqrt(total / count)


def measure(model: nn.Module, arm: Arm, data: Iterable, loss_fn: Callable | None = None, *,
            num_batches: int | None = None, rules: Sequence[str] = RULES, output_fn: Callable | None = None,
            sharpness_iters: int = 50, sharpness_batches: int | None = None, seed: int = 0) -> dict[str, float]:
    """Each rule's quantity ``q`` (module docstring) for ``model`` as ``arm`` sets it up (already done).

    The optimizer's first step is taken for real at ``lr = 1`` without weight decay, on the mean
    gradient over the batches in ``eval()`` mode, and undone: parameters, ``.grad``, flags, modes and
    the global RNG are restored exactly. ``sharpness_batches`` limits the sharpness rules (``iters``
    Hessian-vector products each) to the first batches (default: all).
    """
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise ValueError(f"unknown rule(s) {unknown}; rules: {list(RULES)}")
    loss_fn, output_fn = loss_fn or default_loss, output_fn or _default_output
    batches = take_batches(data, num_batches)
    out: dict[str, float] = {}
    with _Preserved(model), _math_attention():
        model.eval()
        trainable(model)  # a clear error before anything else
        opt = _optimizer(model, arm)
        params = [p for _, p in trainable(model)]  # after the optimizer: LoRA-FA freezes A
        grads = torch.autograd.grad(mean_loss(model, batches, loss_fn), params, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, grads)]
        flat_g = HessianOperator.flat(g).double()
        if not torch.isfinite(flat_g).all():
            raise FloatingPointError("non-finite gradient of the loss; the model was not changed")
        before = [p.detach().clone() for p in params]
        try:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
            u = [(b - p.detach()) for b, p in zip(before, params)]
        finally:
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
        del opt
        flat_u = HessianOperator.flat(u).double()
        if not torch.isfinite(flat_u).all():
            raise FloatingPointError("the optimizer's first step is not finite; the model was not changed")
        gu = torch.dot(flat_g, flat_u).item()
        if "loss" in rules:
            out["loss"] = gu
        if "directional" in rules:  # a fresh graph: the restore above bumped the parameters' versions
            op = HessianOperator(model, params, batches, loss_fn)
            out["directional"] = torch.dot(flat_u, op(flat_u)).item() / gu
            del op
        if "function" in rules:
            out["function"] = _jvp_norm(model, params, u, batches, output_fn)
    for rule, pre in (("sharpness", "none"), ("sharpness_adam", "adam")):
        if rule in rules:
            nb = len(batches) if sharpness_batches is None else min(sharpness_batches, len(batches))
            out[rule] = sharpness(model, batches, loss_fn, num_batches=nb, preconditioner=pre, iters=sharpness_iters,
                                  seed=seed)  # signed here; its magnitude is the rule's q
    return out


def rule_quantity(rule: str, measured: Mapping[str, float]) -> float:
    """The rule's ``q`` from ``measure``'s output (sharpness enters by its magnitude)."""
    return abs(measured[rule]) if rule.startswith("sharpness") else measured[rule]


def transfer_lr(build_model: Callable[[], nn.Module], reference: LoRAConfig | FullFineTune | Arm,
                reference_lr: float, configs: Mapping[str, LoRAConfig | FullFineTune | Arm], data: Iterable,
                loss_fn: Callable | None = None, *, num_batches: int | None = None, rule: str = DEFAULT_RULE,
                output_fn: Callable | None = None, sharpness_iters: int = 50, seed: int = 0) -> dict[str, float]:
    """Per label of ``configs``, the learning rate predicted to be as good for that configuration as
    ``reference_lr`` is for ``reference``: ``reference_lr * q(reference) / q(config)`` with ``q`` the
    quantity of ``rule`` (module docstring), measured at initialization only.

    ``build_model()`` returns a fresh base model each call. A configuration is a ``LoRAConfig``
    (trained with AdamW), a ``FullFineTune``, or an ``Arm`` naming the preconditioner and base
    optimizer too. Data-driven initializers and the measurement use the same batches.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; rules: {list(RULES)}")
    if not (isinstance(reference_lr, (int, float)) and not isinstance(reference_lr, bool)
            and math.isfinite(reference_lr) and reference_lr > 0):
        raise ValueError(f"reference_lr must be a positive finite number, got {reference_lr!r}")
    batches = take_batches(data, num_batches)
    q = {}
    for label, cfg in [("__reference__", reference), *configs.items()]:
        arm = cfg if isinstance(cfg, Arm) else Arm(cfg)
        model = build_model()
        _setup(model, arm, batches, loss_fn or default_loss)
        q[label] = rule_quantity(rule, measure(model, arm, batches, loss_fn, rules=[rule], output_fn=output_fn,
                                               sharpness_iters=sharpness_iters, seed=seed))
        if not (math.isfinite(q[label]) and q[label] > 0):
            raise FloatingPointError(f"rule {rule!r} gives q = {q[label]} for {label!r}: it predicts no rate; "
                                     f"try another rule ({list(RULES)})")
    ref = q.pop("__reference__")
    return {label: reference_lr * ref / v for label, v in q.items()}
