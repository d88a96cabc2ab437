"""One pass over the data that collects exactly the statistics an initializer declares it needs.

An :class:`~lowrank.init.base.Initializer` lists its needs in ``needs`` (names of registered statistics,
``lowrank.list_statistics()``; each is a :class:`~lowrank.init.stats.Statistic` class in its own file under
``lowrank/init/stats/``); :func:`collect_statistics` runs one pass over the data that feeds one instance of each
and returns, per target layer, what they provide. The built-in ones:

``"gradient"``
    ``G = (1/N_b) sum_b dL_b/dW``: the true mean over ``N_b`` batches of each batch's gradient of
    its loss w.r.t. the layer's weight, float32 ``(d_out, d_in)``. Collected by hooks, never
    through ``.grad``: a forward hook keeps the layer's input ``x`` and taps its output ``y``
    (``y + 0`` with a zero scalar that requires grad, if ``y`` is not already in the graph); a
    tensor hook on ``y`` receives ``g = dL/dy`` and adds ``g^T x`` to the accumulator. So
    every backward call in the loss function counts once, whatever it does with ``.grad``,
    and the sum is divided by the number of *batches* (not of backward calls, PEFT's pitfall).
``"covariance"``
    ``C = X^T X / N`` (float32 ``(d_in, d_in)``), ``X`` the layer's input rows over all batches
    (``N`` rows: tokens, padding excluded, see ``mask_padding``), with ``input_mean`` ``(d_in,)``
    and ``rows`` ``N`` (CorDA's statistic).
``"input_svd"``
    The singular values and right-singular vectors of ``X`` (optionally centred), for EVA:
    collected incrementally as the same ``X^T X`` and ``sum x`` (no activation is kept), and
    factorized once at the end (:func:`input_svd`), so the result is exact, not the estimate of
    an incremental PCA.

A pass whose needs are forward-only (no ``"gradient"``) runs under ``torch.no_grad()`` and does
no backward pass: ``loss_fn`` (default: the model's forward) is only called for its forward.

Guarantees: float32 sums; nothing left behind (hooks removed, ``requires_grad`` flags, ``.grad``
references, train/eval modes and the global RNG, CPU and CUDA, restored, also on error);
optional CPU offload of the accumulators; under ``torch.distributed`` every rank passes its
own shard, the float32 sums and counts are all-reduced and rank 0's totals broadcast, so every
rank holds the same bits, the mean over the union of the shards; an error on any rank is raised
on all; a layer the data never reaches is an error that names it. On an FSDP2-sharded model the
pass holds one block's gathered parameters at a time (:func:`lowrank.sharding.one_block_at_a_time`:
FSDP's backward prefetch off, its forward all-gather buffer freed per block), FSDP's settings restored.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist_helpers
from ..quant import autograd_4bit
from ..registry import STATISTIC_REGISTRY
from ..sharding import one_block_at_a_time
from .stats import GradientSink, LayerInput, Statistic
from .stats.inputs import GRAM_BLOCK, symmetrize_, upper_gram  # noqa: F401  (re-exported)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` (a dict batch), ``model(*batch).loss`` (a tuple) or ``model(batch).loss``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError("the model's output has no .loss (does the batch carry labels?); "
                         "pass loss_fn=lambda model, batch: <scalar loss> to lowrank.inject")
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """The model's forward on a dict (``model(**batch)``), tuple (``model(*batch)``) or tensor batch."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def check_needs(needs: Sequence[str], owner: str) -> tuple[str, ...]:
    known = STATISTIC_REGISTRY.list()
    unknown = [n for n in needs if n not in STATISTIC_REGISTRY]
    if unknown:
        raise ValueError(f"{owner} declares unknown statistics {unknown}; the registered statistics are {known} "
                         "(add one with lowrank.register_statistic)")
    return tuple(STATISTIC_REGISTRY.canonical(n) for n in needs)


def collect_statistics(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                       loss_fn: Callable[[nn.Module, Any], Any] | None, needs: Sequence[str], *,
                       num_batches: int | None = None, train_mode: bool = False, offload: bool = False,
                       progress: bool = True, distributed: bool = True, mask_padding: bool = True,
                       gradient_sink: "GradientSink | None" = None,
                       losses: list[float] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer, the statistics named in ``needs`` (see the module docstring), from one pass over ``data``.

    Args:
        model: the model, unchanged on return (or on error).
        modules: ``{dotted name: nn.Linear or Conv1D}`` inside ``model``.
        data: iterable of batches; dict/tuple/tensor batches are moved to the model's device.
        loss_fn: ``loss_fn(model, batch)``; with a backward statistic (``"gradient"``) it must return the batch's
            scalar loss (a mean over its examples) and may call ``backward`` itself (then return a detached loss).
            ``None``: the model's ``.loss`` for gradients, its plain forward for forward-only statistics.
        needs: names of registered statistics (``lowrank.list_statistics()``).
        num_batches: batches to use (``None``: all of ``data``); fewer available is an error.
        train_mode: run in ``model.train()`` (dropout on) instead of ``eval()``.
        offload: keep the float32 accumulators on the CPU.
        progress: a tqdm bar over batches.
        distributed: under an initialized process group (world size > 1) the result is over all ranks'
            batches, bitwise identical on every rank; ``num_batches`` counts this rank's batches.
        mask_padding: input statistics skip the rows of padding tokens, where a dict batch has an
            ``attention_mask`` of the layer input's leading shape (matched by shape alone: a layer whose
            input is ``(batch, tokens, d)`` of another sequence with the same shape would be masked too;
            pass ``False`` for such models, e.g. encoder-decoders with equal lengths).
        gradient_sink: with ``"gradient"``, a :class:`~lowrank.init.stats.GradientSink` that receives each
            gradient piece ``(g, x)`` instead of the dense ``G`` (``lowrank.init.sketch``); the result then has
            no ``"gradient"`` entry, the sink's accumulators are summed (and all-reduced) in its place.
        losses: if a list, each batch's loss is appended to it (to check later passes see the same data).
    """
    needs = check_needs(needs, "collect_statistics")
    if not needs:
        raise ValueError("collect_statistics needs at least one statistic")
    if not modules:
        raise ValueError("no layers to collect statistics for")
    device = next(iter(modules.values())).weight.device
    run = _Pass(modules, _statistics(needs, modules, torch.device("cpu") if offload else device, offload,
                                     gradient_sink))
    loss_fn = loss_fn if loss_fn is not None else default_loss if run.backward else default_forward
    n_done, error = 0, None
    try:
        with autograd_4bit(model):
            n_done = _local_pass(model, run, data, loss_fn, mask_padding, num_batches, train_mode, progress, device,
                                 losses)
        if num_batches is not None and n_done < num_batches:
            raise ValueError(f"data gave only {n_done} batches but num_batches={num_batches}; pass more data or lower "
                             f"init_options['num_batches']")
    except Exception as exc:  # noqa: BLE001  (re-raised below, on every rank if distributed)
        error = exc
    combine = distributed and dist_helpers.active()
    if combine:  # an error on one rank is an error on all, not a hang
        dist_helpers.agree(error, what="gradient estimation" if run.backward else "the input statistics pass")
    elif error is not None:
        raise error
    n_total = dist_helpers.combine_sums(run.totals(), n_done) if combine else n_done
    if n_total == 0:
        raise ValueError("data gave no batches; pass data=<iterable of batches> (e.g. a DataLoader) to lowrank.inject")
    run.check_reached(local=not combine)
    return {n: {k: v for s in run.stats for k, v in s.result(n, n_total).items()} for n in modules}


def _statistics(needs: Sequence[str], modules: Mapping[str, nn.Module], device: torch.device, offload: bool,
                gradient_sink: GradientSink | None) -> list[Statistic]:
    """One instance per distinct registered class among ``needs`` (``"covariance"`` and ``"input_svd"`` share
    theirs); the sink, if any, in place of ``"gradient"``."""
    classes = list(dict.fromkeys(STATISTIC_REGISTRY.get(n) for n in needs if not (n == "gradient" and gradient_sink)))
    return [cls(modules, device, offload) for cls in classes] + ([gradient_sink] if gradient_sink and
                                                                  "gradient" in needs else [])


class _Pass:
    """The hooks of one statistics pass, feeding ``stats``, and what they saw (layers reached, the last input)."""

    def __init__(self, modules: Mapping[str, nn.Module], stats: list[Statistic]):
        self.modules, self.stats = modules, stats
        self.backward = [s for s in stats if s.uses_backward]
        self.inputs = [s for s in stats if type(s).on_input is not Statistic.on_input]
        self.calls = dict.fromkeys(modules, 0)
        self.mask: torch.Tensor | None = None
        self.last: tuple | None = None  # (input tensor, its version, LayerInput)

    def sums(self) -> list[torch.Tensor]:
        return [t for s in self.stats for kind in s.sums for t in kind.values()]

    def totals(self) -> list[torch.Tensor]:
        return self.sums() + [s.counts for s in self.stats if s.counts is not None]

    def reset(self) -> None:
        self.mask, self.last = None, None

    def layer_input(self, inp: torch.Tensor) -> LayerInput:
        # Consecutive layers fed the same tensor (query, key, value) share one LayerInput. Only the last input is
        # kept (holding it, its identity cannot pass to another tensor meanwhile): an input is freed as soon as the
        # next layer's arrives; one changed in place is taken anew.
        if self.last is None or self.last[0] is not inp or self.last[1] != inp._version:
            x, mask = inp.detach(), self.mask
            rows = x[mask] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            self.last = (inp, inp._version, LayerInput(rows.float()))
        return self.last[2]

    def forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if self.inputs:
                inp = self.layer_input(args[0])
                for s in self.inputs:
                    s.on_input(name, inp)
                self.calls[name] += not self.backward
            if not self.backward or not torch.is_grad_enabled():
                return None  # no_grad inside loss_fn: the layer is reported as unreached
            replaced = None
            if not out.requires_grad:  # tap: y joins the graph without giving any weight a gradient
                replaced = out = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            x = args[0].detach()
            out.register_hook(self.grad_hook(name, [s.hold(name, x.reshape(-1, x.shape[-1])) for s in self.backward]))
            return replaced
        return hook

    def grad_hook(self, name: str, held: list[torch.Tensor]):
        def hook(g: torch.Tensor) -> None:
            g2 = g.reshape(-1, g.shape[-1]).float()
            for s, x in zip(self.backward, held):
                s.on_gradient(name, g2, x)
            self.calls[name] += 1
        return hook

    def nonfinite(self, name: str) -> bool:
        return any(not torch.isfinite(kind[name]).all() for s in self.stats for kind in s.sums)

    def check_reached(self, local: bool) -> None:
        """Every layer was reached (``local``: by this process's hooks too, not only in the all-reduced sums)."""
        unreached = [n for n in self.modules if (local and not self.calls[n]) or not all(s.reached(n)
                                                                                          for s in self.stats)]
        if unreached:
            raise unreached_error(unreached, backward=bool(self.backward))


def unreached_error(unreached: Sequence[str], backward: bool) -> ValueError:
    """The error for target layers the data never reached (named, the first five)."""
    what = "their gradient is zero or missing" if backward else "they never receive an input"
    return ValueError(f"the data does not reach {len(unreached)} target layer(s), {what}: "
                      f"{list(unreached[:5])}{' ...' if len(unreached) > 5 else ''}; remove them from targets or fix "
                      "loss_fn / the data")


def input_svd(stats: Mapping[str, torch.Tensor], *, centred: bool = False, k: int | None = None,
              vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(S, V)``: the top ``k`` (default all) singular values (descending) and right-singular vectors (columns
    of ``V (d_in, k)``) of the layer's input rows ``X (N, d_in)``, centred (``X - 1 mu^T``) or not;
    ``vectors=False``: ``S`` only (``V`` is ``None``), cheaper.

    From the collected ``C = X^T X / N`` and ``mu``: ``X^T X = N C`` (centred: ``N (C - mu mu^T)``), whose
    eigenvectors are ``V`` and eigenvalues ``S^2``; factorized in float64 (one triangle is read). The sums
    are float32: centring subtracts ``N mu mu^T`` at the end, so when the mean dominates the spread
    (centred / raw second moment below 1e-3) digits are lost, and a warning says how many.
    """
    N = int(stats["rows"])
    gram = stats["covariance"].double()
    if centred:
        mu = stats["input_mean"].double()
        total = gram.diagonal().sum()
        gram.sub_(torch.outer(mu, mu))
        spread = gram.diagonal().sum()
        if spread < 1e-3 * total:  # float32 sums of x x^T keep ~7 digits of the raw second moment
            warnings.warn(f"the layer inputs' mean dominates their spread (centred/raw second moment {spread / total:.1e}); "
                          "the centred SVD from float32 sums has lost about "
                          f"{-math.log10(max(spread / total, 1e-30)):.0f} of its ~7 digits", stacklevel=3)
    gram.mul_(N)
    k = gram.shape[0] if k is None else k
    if not vectors:
        return torch.linalg.eigvalsh(gram).flip(0)[:k].clamp_min(0).sqrt().float(), None
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    del gram
    return evals.flip(0)[:k].clamp_min(0).sqrt().float(), evecs[:, -k:].flip(1).float()


def data_options_check(num_batches: Any) -> None:
    if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool)
                                    or num_batches <= 0):
        raise ValueError(f"invalid num_batches={num_batches!r}: must be a positive int or None (all data)")


def _check_not_empty(batch: Any, index: int) -> None:
    """A batch whose tensors hold no example (a ragged last shard, a filter that emptied it) is named, not fed to
    the model (where it fails deep inside a reshape). Batches of different sizes are fine: ``G`` is the mean of
    the per-batch gradients."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    if any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 0 for v in values):
        raise ValueError(f"batch {index} of data is empty (a tensor with 0 rows); drop empty batches (e.g. "
                         "DataLoader(drop_last=True) or a filter) before passing data")


def _local_pass(model, run: _Pass, data, loss_fn, mask_padding, num_batches, train_mode, progress, device,
                losses=None) -> int:
    """This process's batches: returns how many were used; every contribution lands in ``run``'s statistics."""
    want_grad = bool(run.backward)
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    n_done = 0
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(torch.enable_grad() if want_grad else torch.no_grad())
        handles = [m.register_forward_hook(run.forward_hook(n)) for n, m in run.modules.items()]
        stack.callback(lambda: [h.remove() for h in handles])
        stack.callback(lambda: [m.train(t) for m, t in modes])
        stack.callback(lambda: [(p.requires_grad_(f), setattr(p, "grad", g)) for p, f, g in saved])
        stack.callback(run.reset)
        for p in params:
            p.requires_grad_(False)
        stack.enter_context(one_block_at_a_time(model))  # FSDP2: no overlap buffers (nothing to overlap here)
        model.train(train_mode)
        desc = "lowrank gradient estimate" if want_grad else "lowrank input statistics"
        bar = tqdm(total=num_batches, desc=desc, disable=not progress, leave=False)
        stack.callback(bar.close)
        for batch in data:
            if num_batches is not None and n_done >= num_batches:
                break
            batch = _to_device(batch, device)
            _check_not_empty(batch, n_done)
            mask = batch.get("attention_mask") if mask_padding and isinstance(batch, Mapping) else None
            run.mask = mask.bool() if isinstance(mask, torch.Tensor) else None
            loss = loss_fn(model, batch)
            if want_grad:
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(f"loss_fn must return a scalar tensor; batch {n_done} gave {type(loss).__name__}"
                                    f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} on batch {n_done}; check the data or "
                                             "loss_fn")
                if losses is not None:
                    losses.append(float(loss.detach()))
                if loss.requires_grad:
                    loss.backward()
            del loss  # drop the graph now: its nodes hold this batch's hooks, and they hold the layer inputs
            run.last = None  # and the last input's products
            # One reduction per accumulator and a single sync: a non-finite entry makes its sum non-finite.
            sums = run.sums()
            if sums and not torch.isfinite(torch.stack([a.sum() for a in sums])).all():
                bad = [n for n in run.modules if run.nonfinite(n)]
                if bad:  # (a sum can also overflow on finite entries: that is not an error)
                    kind = "gradient" if want_grad else "input statistics"
                    raise FloatingPointError(f"non-finite {kind} on batch {n_done} for layer {bad[0]!r}"
                                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
            n_done += 1
            bar.update()
    return n_done
