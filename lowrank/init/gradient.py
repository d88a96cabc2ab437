"""Gradient estimation for data-driven initializers (LoRA-GA, LoRA-One).

For every target layer ``G = (1/N) sum_b dL_b/dW``: the true mean over ``N`` batches of each
batch's gradient of its loss w.r.t. the layer's weight, as float32 ``(d_out, d_in)``.

How: no weight gets ``requires_grad``. A forward hook on each target layer keeps the layer's
input ``x`` and taps its output ``y`` (``y + 0`` with a zero scalar that requires grad, when
``y`` is not already part of the graph); a tensor hook on ``y`` receives ``g = dL/dy`` during
backward and adds ``g^T x`` (float32, summed over batch and sequence) to the layer's
accumulator. So no ``.grad`` is materialized for any parameter, and whatever the loss
function does between batches (``zero_grad``, several ``backward`` calls on parts of the
batch) every contribution is counted once; the sum is divided by the number of *batches*
(not of backward calls, PEFT's pitfall).

Afterwards nothing is left: hooks removed, ``requires_grad`` flags, ``.grad`` references and
train/eval modes restored, the global RNG (CPU and CUDA) as it was.

Under ``torch.distributed`` (a process group with several ranks), every rank estimates on its
own shard and the float32 sums and batch counts are all-reduced, so ``G`` is the mean over the
union of the ranks' batches, the same bits on every rank; an error on any rank is raised on all.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist_helpers
from ..adapters.base import weight_shape
from .base import Initializer


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def estimate_gradients(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                       loss_fn: Callable[[nn.Module, Any], torch.Tensor], *, num_batches: int | None = None,
                       train_mode: bool = False, offload: bool = False, progress: bool = True,
                       distributed: bool = True) -> dict[str, torch.Tensor]:
    """Mean gradient ``G`` (float32, ``(d_out, d_in)``) of every layer in ``modules`` over ``num_batches`` batches.

    Args:
        model: the model, unchanged on return (or on error).
        modules: ``{dotted name: nn.Linear or Conv1D}`` inside ``model``.
        data: iterable of batches; dict/tuple/tensor batches are moved to the model's device.
        loss_fn: ``loss_fn(model, batch)`` returns the batch's scalar loss (a mean over its examples).
            It may call ``backward`` itself (then return a detached loss): every backward pass
            during the call counts towards that batch's gradient.
        num_batches: batches to use (``None``: all of ``data``); fewer available is an error.
        train_mode: run in ``model.train()`` (dropout on) instead of ``eval()``.
        offload: keep the float32 accumulators on the CPU.
        progress: show a tqdm bar over batches.
        distributed: under an initialized process group (world size > 1), each rank passes its own
            shard as ``data`` and the result is the mean over *all* ranks' batches, bitwise identical
            on every rank (``lowrank.distributed``); ``num_batches`` counts this rank's batches.
            ``False``: this process only.
    """
    if not modules:
        raise ValueError("no layers to estimate gradients for")
    device = next(iter(modules.values())).weight.device
    acc_device = torch.device("cpu") if offload else device
    acc = {n: torch.zeros(weight_shape(m), dtype=torch.float32, device=acc_device) for n, m in modules.items()}
    calls = dict.fromkeys(modules, 0)

    def contribution(name: str, x: torch.Tensor):
        def hook(g: torch.Tensor) -> None:
            g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
            if offload:
                acc[name].add_((g2.T @ x2).cpu())
            else:  # accumulate in place: no (m, n) temporary
                acc[name].addmm_(g2.T, x2)
            calls[name] += 1
        return hook

    def forward_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None  # the loss function chose no_grad here; the layer will be reported as unreached
            replaced = None
            if not out.requires_grad:  # tap: make y part of the graph without giving any weight a gradient
                replaced = out = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            out.register_hook(contribution(name, args[0].detach()))
            return replaced
        return hook

    combine = distributed and dist_helpers.active()
    n_done = 0
    error: BaseException | None = None
    try:
        n_done = _local_pass(model, modules, data, loss_fn, acc, forward_hook, num_batches, train_mode, progress,
                             device)
        if num_batches is not None and n_done < num_batches:
            raise ValueError(f"data gave only {n_done} batches but num_batches={num_batches}; pass more data or lower "
                             f"init_options['num_batches']")
    except Exception as exc:  # noqa: BLE001  (re-raised below, on every rank if distributed)
        error = exc
    if combine:
        dist_helpers.agree(error)  # an error on one rank is an error on all, not a hang
        n_total = dist_helpers.combine_sums(acc.values(), n_done)
        reached = {n for n in modules if acc[n].any()}
    else:
        if error is not None:
            raise error
        n_total = n_done
        reached = {n for n in modules if calls[n] and acc[n].any()}
    if n_total == 0:
        raise ValueError("data gave no batches; pass data=<iterable of batches> (e.g. a DataLoader) to lowrank.inject")
    unreached = [n for n in modules if n not in reached]
    if unreached:
        raise ValueError(f"the loss does not reach {len(unreached)} target layer(s), their gradient is zero or missing: "
                         f"{unreached[:5]}{' ...' if len(unreached) > 5 else ''}; remove them from targets or fix loss_fn")
    return {n: a.div_(n_total) for n, a in acc.items()}


def _local_pass(model, modules, data, loss_fn, acc, forward_hook, num_batches, train_mode, progress, device) -> int:
    """This process's batches: returns how many were used; every contribution lands in ``acc``."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    n_done = 0
    bad: list[str] = []
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(torch.enable_grad())
        handles = [m.register_forward_hook(forward_hook(n)) for n, m in modules.items()]
        stack.callback(lambda: [h.remove() for h in handles])
        stack.callback(lambda: [m.train(t) for m, t in modes])
        stack.callback(lambda: [(p.requires_grad_(f), setattr(p, "grad", g)) for p, f, g in saved])
        for p in params:
            p.requires_grad_(False)
        model.train(train_mode)
        bar = tqdm(total=num_batches, desc="lowrank gradient estimate", disable=not progress, leave=False)
        stack.callback(bar.close)
        for batch in data:
            if num_batches is not None and n_done >= num_batches:
                break
            loss = loss_fn(model, _to_device(batch, device))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor; batch {n_done} gave {type(loss).__name__}"
                                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} on batch {n_done}; check the data or loss_fn")
            if loss.requires_grad:
                loss.backward()
            # Drop the graph now: its nodes hold this batch's hooks, and they hold the layer inputs.
            loss = loss.detach()
            # One reduction per layer and a single sync: a non-finite entry makes its sum non-finite
            # (a sum can also overflow on finite entries: the slow path below tells them apart).
            if not torch.isfinite(torch.stack([a.sum() for a in acc.values()])).all():
                bad = [n for n, a in acc.items() if not torch.isfinite(a).all()]
            if bad:
                raise FloatingPointError(f"non-finite gradient on batch {n_done} for layer {bad[0]!r}"
                                         + (f" (and {len(set(bad)) - 1} more)" if len(set(bad)) > 1 else ""))
            n_done += 1
            bar.update()
    return n_done


@dataclass(frozen=True)
class GradientOptions:
    """Options shared by every gradient-based initializer."""

    num_batches: int | None = None
    """Batches of ``data`` to average (``None``: all of it)."""
    train_mode: bool = False
    """Estimate with dropout on (``model.train()``); default ``eval()``, deterministic."""
    offload: bool = False
    """Keep the float32 gradient accumulators on the CPU."""
    progress: bool = True
    """Progress bar over batches."""
    distributed: bool = True
    """Under torch.distributed, average over every rank's batches (each rank passes its shard)."""

    def __post_init__(self):
        if self.num_batches is not None and (not isinstance(self.num_batches, int) or self.num_batches <= 0):
            raise ValueError(f"invalid num_batches={self.num_batches!r}: must be a positive int or None (all data)")


class GradientInitializer(Initializer):
    """Base of initializers that need ``G = dL/dW`` at initialization (``ctx.gradient()``)."""

    Options = GradientOptions
    uses_data = True

    def collect(self, model, modules, data, loss_fn):
        o = self.options
        grads = estimate_gradients(model, modules, data, loss_fn, num_batches=o.num_batches, train_mode=o.train_mode,
                                   offload=o.offload, progress=o.progress, distributed=o.distributed)
        return {name: {"gradient": g} for name, g in grads.items()}
