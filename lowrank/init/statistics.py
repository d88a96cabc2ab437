"""One pass over the data that collects exactly the statistics an initializer declares it needs.

An :class:`~lowrank.init.base.Initializer` lists its needs in ``needs`` (a tuple of names from
:data:`STATISTICS`); :func:`collect_statistics` runs one pass over the data and returns, per
target layer, what those needs ask for:

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
on all; a layer the data never reaches is an error that names it.
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
from ..adapters.base import weight_shape

STATISTICS = ("gradient", "covariance", "input_svd")
"""What an initializer can declare in ``needs``."""


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
    unknown = [n for n in needs if n not in STATISTICS]
    if unknown:
        raise ValueError(f"{owner} declares unknown statistics {unknown}; the statistics pass collects {STATISTICS}")
    return tuple(needs)


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
        loss_fn: ``loss_fn(model, batch)``; with ``"gradient"`` it must return the batch's scalar loss (a mean
            over its examples) and may call ``backward`` itself (then return a detached loss). ``None``: the
            model's ``.loss`` for gradients, its plain forward for forward-only statistics.
        needs: names from :data:`STATISTICS`.
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
        gradient_sink: with ``"gradient"``, hand each gradient piece ``(g, x)`` (``g = dL/dy`` and ``x`` as
            ``(tokens, d)`` float32 matrices, ``G = sum g^T x``) to the sink instead of forming ``G``
            (``lowrank.init.sketch``); the result then has no ``"gradient"`` entry, the sink's
            accumulators are summed (and all-reduced) in its place.
        losses: if a list, each batch's loss is appended to it (to check later passes see the same data).
    """
    needs = check_needs(needs, "collect_statistics")
    if not needs:
        raise ValueError("collect_statistics needs at least one statistic")
    if not modules:
        raise ValueError("no layers to collect statistics for")
    want_grad = "gradient" in needs
    want_inputs = "covariance" in needs or "input_svd" in needs
    if loss_fn is None:

        loss_fn = default_loss if want_grad else default_forward
    device = next(iter(modules.values())).weight.device
    acc_device = torch.device("cpu") if offload else device
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=acc_device)  # noqa: E731
    grad = {n: zeros(weight_shape(m)) for n, m in modules.items()} if want_grad and gradient_sink is None else {}
    grad_kinds = [grad] if grad else list(gradient_sink.accumulators) if gradient_sink is not None and want_grad else []
    gram = {n: zeros(weight_shape(m)[1], weight_shape(m)[1]) for n, m in modules.items()} if want_inputs else {}
    xsum = {n: zeros(weight_shape(m)[1]) for n, m in modules.items()} if want_inputs else {}
    rows = torch.zeros(len(modules), dtype=torch.int64)
    index = {n: i for i, n in enumerate(modules)}
    calls = dict.fromkeys(modules, 0)
    state: dict[str, Any] = {"mask": None, "seen": {}}

    def add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        if offload:
            acc.add_((a @ b).cpu())
        else:  # in place: no (m, n) temporary
            acc.addmm_(a, b)

    def grad_hook(name: str, x: torch.Tensor):
        # What the backward needs of the input: x itself for G, or (a sink's choice) a thin product of it,
        # so that the layer input is not held until the backward reaches the layer.
        held = gradient_sink.hold(name, x.reshape(-1, x.shape[-1])) if gradient_sink is not None else x

        def hook(g: torch.Tensor) -> None:
            g2 = g.reshape(-1, g.shape[-1]).float()
            if gradient_sink is not None:
                gradient_sink.accumulate(name, g2, held)
            else:
                add(grad[name], g2.T, held.reshape(-1, held.shape[-1]).float())
            calls[name] += 1
        return hook

    def forward_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            x = args[0].detach()
            if want_inputs:
                # Consecutive layers fed the same tensor (query, key, value) share one product. Only the last
                # input is kept (holding it, its identity cannot pass to another tensor meanwhile): an input is
                # freed as soon as the next layer's arrives.
                hit = state["seen"].get("last")
                if hit is None or hit[0] is not args[0] or hit[4] != args[0]._version:  # changed in place: redo
                    mask = state["mask"]
                    rows_x = x[mask] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
                    rows_x = rows_x.float()
                    state["seen"].clear()
                    hit = state["seen"]["last"] = (args[0], upper_gram(rows_x), rows_x.sum(0), rows_x.shape[0],
                                                   args[0]._version)
                _, g, sx, nrows, _ = hit
                gram[name].add_(g.to(acc_device))
                xsum[name].add_(sx.to(acc_device))
                rows[index[name]] += nrows
                calls[name] += not want_grad
            if not want_grad or not torch.is_grad_enabled():
                return None  # no_grad inside loss_fn: the layer is reported as unreached
            replaced = None
            if not out.requires_grad:  # tap: y joins the graph without giving any weight a gradient
                replaced = out = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            out.register_hook(grad_hook(name, x))
            return replaced
        return hook

    accumulators = [t for kind in (*grad_kinds, gram, xsum) for t in kind.values()]
    combine = distributed and dist_helpers.active()
    n_done = 0
    error: BaseException | None = None
    try:
        n_done = _local_pass(model, modules, data, loss_fn, forward_hook, state, accumulators, want_grad, mask_padding,
                             num_batches, train_mode, progress, device, losses)
        if num_batches is not None and n_done < num_batches:
            raise ValueError(f"data gave only {n_done} batches but num_batches={num_batches}; pass more data or lower "
                             f"init_options['num_batches']")
    except Exception as exc:  # noqa: BLE001  (re-raised below, on every rank if distributed)
        error = exc
    if combine:
        # an error on one rank is an error on all, not a hang
        dist_helpers.agree(error, what="gradient estimation" if want_grad else "the input statistics pass")
        n_total = dist_helpers.combine_sums([*accumulators, rows], n_done)
        reached = {n for n in modules if (not want_grad or any(k[n].any() for k in grad_kinds))
                   and (not want_inputs or rows[index[n]] > 0)}
    else:
        if error is not None:
            raise error
        n_total = n_done
        reached = {n for n in modules if calls[n] and (not want_grad or any(k[n].any() for k in grad_kinds))
                   and (not want_inputs or rows[index[n]] > 0)}
    if n_total == 0:
        raise ValueError("data gave no batches; pass data=<iterable of batches> (e.g. a DataLoader) to lowrank.inject")
    unreached = [n for n in modules if n not in reached]
    if unreached:
        what = "their gradient is zero or missing" if want_grad else "they never receive an input"
        raise ValueError(f"the data does not reach {len(unreached)} target layer(s), {what}: "
                         f"{unreached[:5]}{' ...' if len(unreached) > 5 else ''}; remove them from targets or fix "
                         "loss_fn / the data")
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in modules}
    for n in modules:
        if grad:
            out[n]["gradient"] = grad[n].div_(n_total)
        for kind in grad_kinds if not grad else ():
            kind[n].div_(n_total)  # the sink's sums become means, as G is
        if want_inputs:
            N = int(rows[index[n]])
            out[n]["covariance"] = symmetrize_(gram[n]).div_(N)
            out[n]["input_mean"] = xsum[n].div_(N)
            out[n]["rows"] = torch.tensor(N)
    return out


GRAM_BLOCK = 512
"""Inputs wider than this get their Gram matrix in blocks, upper triangle only (about half the work)."""


def upper_gram(x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``x^T x`` (``(n, n)``) for ``x (N, n)``; for ``n > block`` only its upper block triangle is filled
    (the rest zero; :func:`symmetrize_` completes it), so a wide input costs about half a full product."""
    n = x.shape[1]
    if n <= block:
        return x.T @ x
    out = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    edges = list(range(0, n, block)) + [n]
    for i in range(len(edges) - 1):
        a = x[:, edges[i]:edges[i + 1]]
        out[edges[i]:edges[i + 1], edges[i]:] = a.T @ x[:, edges[i]:]
    return out


def symmetrize_(gram: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """Complete in place a sum of :func:`upper_gram` results: mirror the upper block triangle."""
    n = gram.shape[0]
    if n <= block:
        return gram
    edges = list(range(0, n, block)) + [n]
    for i in range(1, len(edges) - 1):
        gram[edges[i]:, edges[i - 1]:edges[i]] = gram[edges[i - 1]:edges[i], edges[i]:].T
    return gram


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


class GradientSink:
    """Receives the gradient pieces of a statistics pass instead of a dense ``G`` accumulator.

    ``accumulators`` is a list of ``{layer name: tensor}`` dicts (one per kind of accumulator, every
    layer in each): the pass checks them for non-finite values, all-reduces them under
    torch.distributed and divides them by the number of batches, as it does ``G``."""

    accumulators: list[dict[str, torch.Tensor]]

    def hold(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Called in the forward with layer ``name``'s input ``x (T, d_in)`` (the model's dtype): what to keep of
        it until the backward reaches the layer, then passed to :meth:`accumulate` as ``x``. Default: ``x``."""
        return x

    def accumulate(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        """Add the piece ``g^T x`` of layer ``name``'s gradient (``g (T, d_out)`` float32; ``x`` what
        :meth:`hold` kept of the input ``(T, d_in)``, in the model's dtype)."""
        raise NotImplementedError


def _check_not_empty(batch: Any, index: int) -> None:
    """A batch whose tensors hold no example (a ragged last shard, a filter that emptied it) is named, not fed to
    the model (where it fails deep inside a reshape). Batches of different sizes are fine: ``G`` is the mean of
    the per-batch gradients."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    if any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 0 for v in values):
        raise ValueError(f"batch {index} of data is empty (a tensor with 0 rows); drop empty batches (e.g. "
                         "DataLoader(drop_last=True) or a filter) before passing data")


def _local_pass(model, modules, data, loss_fn, forward_hook, state, accumulators, want_grad, mask_padding,
                num_batches, train_mode, progress, device, losses=None) -> int:
    """This process's batches: returns how many were used; every contribution lands in the accumulators."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    n_done = 0
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(torch.enable_grad() if want_grad else torch.no_grad())
        handles = [m.register_forward_hook(forward_hook(n)) for n, m in modules.items()]
        stack.callback(lambda: [h.remove() for h in handles])
        stack.callback(lambda: [m.train(t) for m, t in modes])
        stack.callback(lambda: [(p.requires_grad_(f), setattr(p, "grad", g)) for p, f, g in saved])
        stack.callback(lambda: state.update(mask=None, seen={}))
        for p in params:
            p.requires_grad_(False)
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
            state["mask"] = mask.bool() if isinstance(mask, torch.Tensor) else None
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
            state["seen"].clear()  # and the last input's products
            # One reduction per accumulator and a single sync: a non-finite entry makes its sum non-finite.
            if accumulators and not torch.isfinite(torch.stack([a.sum() for a in accumulators])).all():
                bad = [n for n in modules if _nonfinite(accumulators, n, modules)]
                if bad:  # (a sum can also overflow on finite entries: that is not an error)
                    kind = "gradient" if want_grad else "input statistics"
                    raise FloatingPointError(f"non-finite {kind} on batch {n_done} for layer {bad[0]!r}"
                                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
            n_done += 1
            bar.update()
    return n_done


def _nonfinite(accumulators: list[torch.Tensor], name: str, modules: Mapping[str, nn.Module]) -> bool:
    """Whether any accumulator of layer ``name`` holds a non-finite value (accumulators are per-kind
    lists in ``modules`` order, so layer ``i`` owns every ``len(modules)``-th one from ``i``)."""
    i, L = list(modules).index(name), len(modules)
    return any(not torch.isfinite(a).all() for a in accumulators[i::L])
