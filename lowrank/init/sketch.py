"""Sketched gradient estimation: the top singular triplets of each layer's mean gradient ``G`` without
ever forming ``G``, in ``O((d_out + d_in) k)`` memory per layer instead of ``O(d_out d_in)``.

``G = (1/N) sum_t g_t^T x_t`` reaches the hooks of the statistics pass in pieces (``g = dL/dy``,
``x`` the layer input, ``(tokens, d)`` each). A sketch is a product of ``G`` with a thin matrix,
and it is linear in the pieces, so it streams (Tropp, Yurtsever, Udell, Cevher 2017, "Practical
sketching algorithms for low-rank matrix approximation", SIAM J. Matrix Anal. Appl.; Halko,
Martinsson, Tropp 2011 for the multi-pass range finder):

- right sketch ``Y = G Omega`` (``Omega (d_in, k)``): ``Y += g^T (x Omega)``;
- left sketch ``Z = G^T Q`` (``Q (d_out, k)``): ``Z += x^T (g Q)``;
- co-range sketch ``W = Psi G`` (``Psi (l, d_out)``, ``l = 2k + 1``): ``W += (Psi g^T) x``.

``passes = 1`` (one forward + backward per batch, as the dense estimate): ``Y`` and ``W`` together,
``Q = orth(Y)``, ``X = (Psi Q)^+ W``, ``G ~ Q X`` (Tropp et al., Alg. 7). ``passes = p > 1``: randomized
subspace iteration (Halko et al., Alg. 4.4), each pass one more forward + backward over the same batches,
alternating sides: ``Q_1 = orth(G Omega)``, ``P_1 = orth(G^T Q_1)``, ``Q_2 = orth(G P_1)``, ...; the last
pass's block and its image give ``G ~ G P P^T`` (or ``Q Q^T G``), whose small SVD gives the triplets.
With ``krylov=True`` every block of the last pass's side is kept with its image and the final ``G R R^T``
uses the orthonormal basis ``R`` of all of them, the block Krylov space (Musco & Musco 2015): a little
more accurate, for ``d_out k`` more floats at 3 passes. Work per batch ``O(T (d_out + d_in) k)`` instead
of ``O(T d_out d_in)``; memory at the peak ``(d_out + d_in) k`` floats per layer (the current basis and
its sketch; Omega is regenerated from its seed, an image is kept as the next basis and a ``k x k`` factor).

Every pass must see the same ``G``: ``eval()`` mode and the same batches; a batch whose loss differs
from the first pass's beyond rounding is an error naming it. ``Omega`` and ``Psi`` are seeded per layer
(``layer_seed(seed, name)``); under torch.distributed the sketches are all-reduced after every pass, so
the result equals one process on the union of the shards, the same bits on every rank.

Split state (``shard_state``, on by default for an FSDP2-sharded model under torch.distributed): each layer's
sketch state (its basis and accumulator) lives on one *owner* rank only (:class:`Owners`, balanced by bytes),
so a rank holds ``1/N`` of the ``(d_out + d_in) k`` floats per layer instead of all of them. A layer's basis is
broadcast from its owner when a hook needs it and dropped after use, each batch's contribution is summed onto
the owner (``reduce``) as soon as the hook computes it, the owner factorizes its layers, and the final triplets
(``k`` wide, not the sketch width) are broadcast. Every rank must then run the same number of batches (as FSDP2
already needs: its forward all-gathers are collectives too; a difference each rank can count is an error before
the pass), and an error raised on one rank in the middle of a pass (a non-finite loss) stops the others in their
next collective rather than reaching them as an error, as it does under FSDP2 anyway. The sum over ranks is taken
per batch instead of per pass: the result equals the replicated one to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .. import distributed as dist_helpers
from ..weights import weight_shape
from ..sharding import is_dtensor
from .base import layer_seed
from .collect import GradientSink, collect_statistics, unreached_error

ESTIMATORS = ("auto", "dense", "sketch")


def _orth(M: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``M`` (float64 QR)."""
    return torch.linalg.qr(M.double()).Q


class Owners:
    """Which rank holds each layer's sketch state when it is split across ranks (``shard_state``).

    Layers go, largest first, to the rank holding the fewest floats so far (``(d_out + d_in) * width`` each,
    :func:`lowrank.distributed.balance`): the same assignment on every rank, since every rank has the same layers (checked before the pass).
    The collectives below are called by every rank for the same layer in the same order: the statistics pass's
    hooks fire in the model's order, the same on every rank."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], width: Mapping[str, int], world: int, rank: int):
        self.rank = rank
        names = list(shapes)
        ranks = dist_helpers.balance([(shapes[n][0] + shapes[n][1]) * width[n] for n in names], world)
        self.owner: dict[str, int] = dict(zip(names, ranks))

    def mine(self, name: str) -> bool:
        return self.owner[name] == self.rank

    def share(self, name: str, held: Mapping[str, torch.Tensor] | None, shape: tuple[int, int],
              device: torch.device) -> torch.Tensor:
        """The owner's ``held[name]`` on every rank (a broadcast; a non-owner gets a new tensor, to drop after use)."""
        t = held[name] if self.mine(name) else torch.empty(shape, dtype=torch.float32, device=device)
        dist_helpers.broadcast_([t], src=self.owner[name])
        return t

    def reduce(self, name: str, part: torch.Tensor) -> torch.Tensor | None:
        """The sum of every rank's ``part`` on the owner (``None`` elsewhere)."""
        part = part.contiguous()
        dist_helpers.reduce_(part, dst=self.owner[name])
        return part if self.mine(name) else None


class _Sketches(GradientSink):
    """One pass's sketches: per layer, ``G @ right[name]`` and/or ``left[name]^T @ G`` (as ``G^T left``).

    A pass with only a right sketch keeps ``x @ right`` (``T x k``) from the forward instead of the layer
    input ``x`` (``T x d_in``): the backward needs nothing else of it. With ``owners`` (split state), the test
    matrices and the accumulators exist only for this rank's layers; the others' bases are broadcast by their
    owners when a hook needs them, and each contribution is reduced onto its owner at once."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], width: Mapping[str, int], device: torch.device,
                 right: Mapping[str, torch.Tensor] | None = None, left: Mapping[str, torch.Tensor] | None = None,
                 corange: Mapping[str, torch.Tensor] | None = None, owners: Owners | None = None):
        self.right, self.left, self.corange, self.owners = right, left, corange, owners
        self.shapes, self.width, self.device = shapes, width, device
        self.project = right is not None and left is None and corange is None
        mine = [n for n in shapes if owners is None or owners.mine(n)]
        f32 = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self.accumulators = []
        if right is not None:
            self.Y = {n: f32(shapes[n][0], width[n]) for n in mine}  # G Omega (m, k)
            self.accumulators.append(self.Y)
        if left is not None:
            self.Z = {n: f32(shapes[n][1], width[n]) for n in mine}  # G^T Q (n, k)
            self.accumulators.append(self.Z)
        if corange is not None:
            self.W = {n: f32(2 * width[n] + 1, shapes[n][1]) for n in mine}  # Psi G (l, n)
            self.accumulators.append(self.W)

    @property
    def sums(self) -> list[dict[str, torch.Tensor]]:  # type: ignore[override]
        # split state: reduced per batch onto the owners, nothing left for the pass to all-reduce or check
        return [] if self.owners else self.accumulators

    def _get(self, kind: str, name: str) -> torch.Tensor:
        held = getattr(self, kind)
        if self.owners is None:
            return held[name]
        m, n = self.shapes[name]
        shape = {"right": (n, self.width[name]), "left": (m, self.width[name]),
                 "corange": (2 * self.width[name] + 1, m)}[kind]
        return self.owners.share(name, held, shape, self.device)

    def _add(self, acc: Mapping[str, torch.Tensor], name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc[name] += a @ b``, summed over the ranks onto the owner with split state."""
        if self.owners is None:
            acc[name].addmm_(a, b)
            return
        part = self.owners.reduce(name, a @ b)
        if part is not None:
            acc[name].add_(part)

    def hold(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self._get("right", name) if self.project else x

    def accumulate(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        if self.project:
            self._add(self.Y, name, g.T, x)  # x is already x @ right
            return
        x = x.float()
        if self.right is not None:
            self._add(self.Y, name, g.T, x @ self._get("right", name))
        if self.left is not None:
            self._add(self.Z, name, x.T, g @ self._get("left", name))
        if self.corange is not None:
            self._add(self.W, name, self._get("corange", name) @ g.T, x)

    def reached(self, name: str) -> bool:
        return True if self.owners else super().reached(name)

    def result(self, name: str, n_batches: int) -> dict[str, torch.Tensor]:
        for kind in self.accumulators:
            if name in kind:
                kind[name].div_(n_batches)
        return {}

    def check_split(self, names: list[str]) -> None:
        """Split state: every layer reached and finite, agreed on every rank (one all-reduce of two flags per
        layer), since only the owner sees a layer's sums."""
        flags = torch.zeros(len(names), 2, device=self.device)
        for i, n in enumerate(names):
            if self.owners.mine(n):
                flags[i, 0] = float(any(bool(kind[n].any()) for kind in self.accumulators))
                flags[i, 1] = float(not all(bool(torch.isfinite(kind[n]).all()) for kind in self.accumulators))
        dist_helpers.all_reduce_(flags)
        bad = [n for i, n in enumerate(names) if flags[i, 1] > 0]
        if bad:
            raise FloatingPointError(f"non-finite gradient sketch for layer {bad[0]!r}"
                                     + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                                     + ": check the data or loss_fn for inf/nan")
        unreached = [n for i, n in enumerate(names) if flags[i, 0] == 0]
        if unreached:
            raise unreached_error(unreached, backward=True)


def default_sketch_size(k: int, m: int, n: int) -> int:
    """Sketch width for the top ``k`` triplets: ``4 k`` (``8r`` for LoRA-GA), at most ``min(m, n)``. Measured on
    MiniLM's gradients (flat spectra) with 3 passes: median excess over the Eckart-Young floor 2e-4 at ``4k``,
    7e-3 at ``2k`` (``experiments/bench_init.py --only sketch``)."""
    return min(4 * k, m, n)


DEFAULT_PASSES = 3
"""Passes of the default sketched estimate (measured in ``experiments/bench_init.py --only sketch``)."""


def sketch_gradient_svd(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None, *, k: Mapping[str, int],
                        sketch_size: Mapping[str, int] | None = None, passes: int = DEFAULT_PASSES,
                        krylov: bool = False, seed: int = 0,
                        num_batches: int | None = None, train_mode: bool = False, progress: bool = True,
                        distributed: bool = True, shard_state: bool | None = None
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer the top ``k[name]`` singular triplets ``(U (m, k), S (k,), V (n, k))`` of the mean gradient,
    float32, from ``passes`` passes over ``data`` with sketches of width ``sketch_size[name]`` (default
    :func:`default_sketch_size`). ``data`` must be re-iterable for ``passes > 1`` (a list, a DataLoader).
    ``krylov``: with several passes, factorize every block of the last side (block Krylov) rather than the
    last block alone (subspace iteration). ``shard_state``: split the sketch state across ranks (see the module
    docstring); ``None`` (default): when ``model`` is FSDP2-sharded and ``distributed`` applies; ``True`` needs
    every rank to run the same number of batches."""
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise ValueError(f"invalid passes={passes!r}: must be an int >= 1")
    if passes > 1 and train_mode:
        raise ValueError("a sketch over several passes needs the same G on every pass: train_mode=True (dropout) "
                         "changes it; use train_mode=False or passes=1")
    if passes > 1 and iter(data) is data:
        raise ValueError(f"passes={passes} go over the data {passes} times, but data is a one-shot iterator "
                         f"({type(data).__name__}); pass re-iterable data (a list or a DataLoader) or passes=1")
    split = distributed and dist_helpers.active() and (
        shard_state if shard_state is not None else any(is_dtensor(m.weight) for m in modules.values()))
    if split:
        _check_same_batch_count(data, num_batches)
    run = _SketchRun(model, modules, data, loss_fn, k, sketch_size, seed,
                     dict(num_batches=num_batches, train_mode=train_mode, progress=progress, distributed=distributed,
                          mask_padding=False), split)
    if passes == 1:
        out = _single_pass(run)
    else:
        kept, side = _subspace_iteration(run, passes, krylov)
        out = {n: _factor_kept(run, n, kept.pop(n), side) for n in run.mine}
    return out if run.owners is None else _share_triplets(run, out)


def _check_same_batch_count(data: Iterable, num_batches: int | None) -> None:
    """Split state: a collective per layer and batch, so every rank must run as many batches; where each rank
    can tell its count (``len(data)``, ``num_batches``), a difference is an error on every rank, before the pass,
    not a hang inside it."""
    import torch.distributed as dist

    try:
        n = len(data)  # type: ignore[arg-type]
        n = n if num_batches is None else min(n, num_batches)
    except TypeError:
        n = num_batches
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, n)
    known = [(r, c) for r, c in enumerate(counts) if c is not None]
    if len({c for _, c in known}) > 1:
        raise ValueError(f"the ranks have different numbers of batches ({', '.join(f'rank {r}: {c}' for r, c in known)})"
                         "; the sketch with its state split across the ranks (and an FSDP2-sharded model) needs the same "
                         "number on every rank: drop the remainder (e.g. DataLoader(drop_last=True) with a "
                         "DistributedSampler) or, on an unsharded model, init_options shard_state=False")


def _share_triplets(run: "_SketchRun", out: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split state: every layer's triplets on every rank, broadcast by its owner (the same bits everywhere)."""
    full = {}
    for n in run.modules:
        (m, d), k = run.shapes[n], run.k[n]
        mine = out.pop(n) if run.owners.mine(n) else None
        U, S, V = mine if mine is not None else (torch.empty(m, k, device=run.device), torch.empty(k, device=run.device),
                                                 torch.empty(d, k, device=run.device))
        dist_helpers.broadcast_([U, S, V], src=run.owners.owner[n])
        full[n] = (U, S, V)
    return full


class _SketchRun:
    """What every pass of one sketched estimate shares: the layers, their sketch widths and seeded test matrices,
    and the first pass's batch losses (every later pass must see the same data)."""

    def __init__(self, model, modules, data, loss_fn, k, sketch_size, seed, options, split=False):
        self.model, self.modules, self.data, self.loss_fn, self.k, self.options = model, modules, data, loss_fn, k, \
            options
        self.shapes = {n: weight_shape(m) for n, m in modules.items()}
        self.width = {}
        for n, (m_, n_) in self.shapes.items():
            w = (sketch_size or {}).get(n) or default_sketch_size(k[n], m_, n_)
            if w < k[n]:
                raise ValueError(f"sketch_size={w} is smaller than the {k[n]} singular triplets layer {n!r} needs; "
                                 f"use sketch_size >= {k[n]} (default 4x that)")
            self.width[n] = min(w, m_, n_)
        self.device = next(iter(modules.values())).weight.device
        self.seeds = {n: layer_seed(seed, f"sketch:{n}") for n in modules}
        self.first: list[float] = []
        self.owners = Owners(self.shapes, self.width, dist_helpers.world_size(), dist_helpers.rank()) if split else None
        self.mine = [n for n in modules if self.owners is None or self.owners.mine(n)]

    def test_matrices(self, n: str, psi: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``Omega (d_in, k)`` (unit-scaled columns) and, for one pass, ``Psi (2k + 1, d_out)``: the same bits
        on every call, so ``Omega`` is regenerated at the end rather than kept through the passes."""
        gen = torch.Generator().manual_seed(self.seeds[n])
        d_out, d_in = self.shapes[n]
        omega = torch.randn(d_in, self.width[n], generator=gen).to(self.device) / math.sqrt(d_in)
        return omega, torch.randn(2 * self.width[n] + 1, d_out, generator=gen).to(self.device) if psi else None

    def one_pass(self, sink: _Sketches, index: int) -> None:
        seen: list[float] = []
        collect_statistics(self.model, self.modules, self.data, self.loss_fn, ("gradient",), gradient_sink=sink,
                           losses=self.first if index == 0 else seen, **self.options)
        if self.owners is not None:
            sink.check_split(list(self.modules))
        if index > 0:
            error = None
            try:
                _check_same_data(self.first, seen, index)
            except ValueError as exc:
                error = exc
            if self.options["distributed"] and dist_helpers.active():
                dist_helpers.agree(error, what="the sketch's same-data check")  # raised on every rank, no hang
            elif error is not None:
                raise error


def _single_pass(run: _SketchRun) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Tropp et al.'s Alg. 7: ``Y = G Omega`` and ``W = Psi G`` in one pass, ``G ~ Q (Psi Q)^+ W``."""
    pairs = {n: run.test_matrices(n, psi=True) for n in run.mine}
    sink = _Sketches(run.shapes, run.width, run.device, right={n: o for n, (o, _) in pairs.items()},
                     corange={n: p for n, (_, p) in pairs.items()}, owners=run.owners)
    run.one_pass(sink, 0)
    out = {}
    for n in run.mine:
        Q = _orth(sink.Y[n])  # (m, k)
        X = torch.linalg.lstsq(pairs[n][1].double() @ Q, sink.W[n].double()).solution  # (k, n)
        Ub, S, Vh = torch.linalg.svd(X, full_matrices=False)
        out[n] = _top(Q @ Ub, S, Vh.T, run.k[n])
    return out


def _subspace_iteration(run: _SketchRun, passes: int, krylov: bool) -> tuple[dict[str, list], str]:
    """Pass 1 applies G to Omega; then each pass applies G^T (or G) to an orthonormal basis of what the previous
    pass returned (subspace iteration). The bases of one side span a Krylov space (P_1, P_2 = orth(G^T G P_1),
    ...), and G times each of them is known: with ``krylov`` the final factorization uses all of them, otherwise
    the last block alone. What is kept is lean: an image is kept as its QR factors, whose Q is the next pass's
    basis anyway (plus a k x k R), and Omega is regenerated from its seed. The peak is (d_out + d_in) k floats
    per layer (the current basis and its sketch), plus d_out k at 3 passes with ``krylov``; a right-side pass
    keeps x @ basis, not the layer input x. Returns the kept ``(basis or None, Q, R)`` blocks per layer and the
    side the last pass's basis was on."""
    kept: dict[str, list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]] = {n: [] for n in run.mine}
    basis = {n: run.test_matrices(n)[0] for n in run.mine}
    side = "right"
    for p in range(passes):
        sink = _Sketches(run.shapes, run.width, run.device, right=basis if side == "right" else None,
                         left=basis if side == "left" else None, owners=run.owners)
        run.one_pass(sink, p)
        images = sink.Y if side == "right" else sink.Z
        # Only the side the last pass applies G (or G^T) to is factorized at the end: keep just its blocks.
        keep = p == passes - 1 or (krylov and (passes - 1 - p) % 2 == 0)
        nxt = {}
        for n in run.mine:
            Qn, Rn = torch.linalg.qr(images[n].double())  # image = Qn Rn; Qn is the next basis
            nxt[n] = Qn.float()
            if keep:  # Omega too, with krylov (as None: regenerated): G Omega is known, more directions are cheap
                kept[n].append((basis[n] if p > 0 else None, nxt[n], Rn))
            images[n] = None  # free the accumulator as soon as it is factored
        del sink, images
        basis, side = nxt, "left" if side == "right" else "right"
    return kept, side


def _factor_kept(run: _SketchRun, n: str, kept: list, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer ``n``'s top triplets from the kept blocks and their images."""
    blocks = [B if B is not None else run.test_matrices(n)[0] for B, _, _ in kept]
    images = [Qn.double() @ Rn for _, Qn, Rn in kept]
    if side == "left":  # the last pass applied G to row bases P: G ~ G R R^T, R = orth([P_1 ...])
        R, GR = _span(blocks, images)
        Ub, S, Wh = torch.linalg.svd(GR, full_matrices=False)  # G R = Ub S Wh
        return _top(Ub, S, R @ Wh.T, run.k[n])
    # the last pass applied G^T to column bases Q: G ~ C C^T G = C (G^T C)^T, C = orth([Q_1 ...])
    C, GtC = _span(blocks, images)
    Vb, S, Uh = torch.linalg.svd(GtC, full_matrices=False)  # G^T C = Vb S Uh
    return _top(C @ Uh.T, S, Vb, run.k[n])


def _span(blocks: list[torch.Tensor], images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, M R)``: an orthonormal basis ``R`` of the columns of ``[B_1 ...]`` and ``M R`` from the known
    images ``M B_i``; directions where the blocks are (numerically) dependent are dropped."""
    Bc, Ic = torch.cat(blocks, dim=1).double(), torch.cat(images, dim=1).double()
    U, s, Vh = torch.linalg.svd(Bc, full_matrices=False)  # Bc = U s Vh, so U = Bc Vh^T / s
    keep = s > s[0] * 1e-3  # each block is orthonormal: this bounds the error amplification of the images by 1e3
    return U[:, keep], Ic @ (Vh[keep].T / s[keep])


def _top(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return U[:, :k].float().contiguous(), S[:k].float().contiguous(), V[:, :k].float().contiguous()


def _check_same_data(first: list[float], seen: list[float], index: int) -> None:
    if len(seen) != len(first):
        raise ValueError(f"pass {index + 1} of the sketch saw {len(seen)} batches, the first saw {len(first)}: "
                         "several passes need re-iterable data (a list or a DataLoader), the same batches each time")
    for i, (a, b) in enumerate(zip(first, seen)):
        if not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6):
            raise ValueError(f"batch {i} gave loss {b:.6g} in pass {index + 1} of the sketch but {a:.6g} in the first: "
                             "every pass must see the same data and model (no shuffling, no dropout); sketches "
                             "assume the same G on each pass")
