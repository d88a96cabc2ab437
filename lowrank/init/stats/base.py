"""The interface of one statistic of the data pass, and what the pass hands it."""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping

import torch
from torch import nn


class LayerInput:
    """A target layer's input in one forward: ``rows`` ``(N, d_in)`` float32 (padding rows dropped, see
    ``mask_padding``), and products of it computed once: consecutive layers fed the same tensor (query, key,
    value) get the same ``LayerInput``, so :meth:`memo` shares their work."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self._memo: dict[str, torch.Tensor] = {}

    def memo(self, key: str, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(rows)``, once per input whatever the number of layers (and statistics) that ask."""
        if key not in self._memo:
            self._memo[key] = compute(self.rows)
        return self._memo[key]


class Statistic:
    """One statistic of a data pass, per target layer. Subclass, register with ``@lowrank.register_statistic(name)``
    and name it in an initializer's ``needs``.

    The pass builds one instance per call with the target layers and the device the sums live on (the CPU with
    ``offload=True``), then calls :meth:`on_input` in every target layer's forward and, if ``uses_backward``,
    :meth:`hold` in the forward and :meth:`on_gradient` when ``dL/dy`` reaches the layer. ``sums`` and ``counts``
    are what the pass checks for non-finite values (``sums`` only) and, under torch.distributed, all-reduces
    (rank 0's totals broadcast): anything a statistic adds up must live there. :meth:`result` turns a layer's
    totals into the entries the initializer reads (``LayerContext.stat(key)``)."""

    uses_backward: ClassVar[bool] = False
    """Needs ``dL/dy`` of the layer output: the pass then runs a backward per batch."""
    provides: ClassVar[tuple[str, ...]] = ()
    """The keys :meth:`result` returns."""

    sums: list[dict[str, torch.Tensor]]
    """Float32 accumulators, one ``{layer: tensor}`` dict per kind, every target layer in each."""
    counts: torch.Tensor | None = None
    """An int64 tensor of per-layer counts (e.g. rows seen), all-reduced with the sums; ``None`` if none."""

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device, offload: bool = False):
        """Allocate the accumulators of ``modules`` (``{name: nn.Linear or Conv1D}``) on ``device``; ``offload``:
        the layers compute elsewhere (move each product to ``device`` before adding it)."""

    def on_input(self, name: str, inp: LayerInput) -> None:
        """Layer ``name``'s forward saw ``inp``."""

    def hold(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What to keep of layer ``name``'s input ``x (T, d_in)`` (the model's dtype) until the backward reaches
        the layer; passed to :meth:`on_gradient` as ``x``. Default: ``x`` itself."""
        return x

    def on_gradient(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        """``g = dL/dy (T, d_out)`` float32 for layer ``name``; ``x`` what :meth:`hold` kept."""

    def reached(self, name: str) -> bool:
        """The data reached layer ``name`` (a layer never reached is an error that names it)."""
        return True

    def result(self, name: str, n_batches: int) -> dict[str, torch.Tensor]:
        """Layer ``name``'s entries, from the (all-reduced) totals over ``n_batches`` batches."""
        return {}


class GradientSink(Statistic):
    """Receives the gradient pieces of a pass in place of the dense ``G`` (``collect_statistics(...,
    gradient_sink=...)``, used by the sketched estimator ``lowrank.init.sketch``). Subclasses fill
    ``accumulators`` (``{layer: tensor}`` dicts) and implement :meth:`accumulate`; the pass checks, all-reduces
    and divides the accumulators by the number of batches, as it does ``G``."""

    uses_backward = True
    accumulators: list[dict[str, torch.Tensor]]

    @property
    def sums(self) -> list[dict[str, torch.Tensor]]:  # type: ignore[override]
        return self.accumulators

    def accumulate(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        """Add the piece ``g^T x`` of layer ``name``'s gradient."""
        raise NotImplementedError

    def on_gradient(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        self.accumulate(name, g, x)

    def reached(self, name: str) -> bool:
        return any(bool(kind[name].any()) for kind in self.accumulators)

    def result(self, name: str, n_batches: int) -> dict[str, torch.Tensor]:
        for kind in self.accumulators:
            kind[name].div_(n_batches)  # the sink's sums become means, as G is
        return {}
