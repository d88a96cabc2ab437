"""How close is the first LoRA step to the first full fine-tuning step?

For a layer with adapter ``(A, B, s)`` and full-weight gradient ``G``, the first-order LoRA step
is ``-lr D`` with ``D = s^2 (B B^T G + G A^T A)`` (rank <= 2r); full fine-tuning steps ``-lr G``.

- ``rel_error = min_c ||G - c D||_F / ||G||_F``, the sine of the angle between ``D`` and ``G``
  (the relative error of ``D`` against ``zeta G`` at the best ``zeta``);
- ``floor = ||G - G_2r||_F / ||G||_F``: by Eckart-Young no rank-``2r`` step does better;
- ``excess = rel_error - floor >= 0``. LoRA-GA's theorem (arXiv 2407.05000, Sec. 3.2):
  ``D = zeta G_2r`` exactly, so ``excess = 0`` and ``rel_error_2r = 0``.
- ``cosine`` of ``(D, G)``; ``zeta = <D, G_2r> / ||G_2r||^2`` (LoRA-GA: ``s^2 c^2``).

``alignment`` takes one layer's tensors; ``init_factors`` runs any registered initializer on
a synthetic layer with a given ``G``; ``adapted_alignment`` measures every adapted layer of a
model at its current point; ``gradients`` and ``compare`` evaluate several initializers on a
real model and real data, all against the same ``G`` (estimated at ``W0``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..config import LoRAConfig
from ..init.base import InitResult
from ..init.driver import LayerSpec, run_initializer
from ..init.gradient import estimate_gradients
from ..inject import adapted_layers, default_loss, find_targets, inject
from .first_step import first_step_direction


@dataclass(frozen=True)
class Alignment:
    """First-step alignment of one layer (see the module docstring)."""

    rel_error: float
    floor: float
    cosine: float
    rel_error_2r: float
    zeta: float
    rank: int

    @property
    def excess(self) -> float:
        return self.rel_error - self.floor

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "excess": self.excess}


def _sine(D: torch.Tensor, T: torch.Tensor) -> float:
    """``min_c ||T - c D|| / ||T||`` (1 when ``D = 0``)."""
    nd, nt = D.norm(), T.norm()
    if nd == 0 or nt == 0:
        return 1.0
    c = (D * T).sum() / nd ** 2  # the residual itself, not sqrt(1 - cos^2), which loses half the digits
    return ((T - c * D).norm() / nt).item()


def _check_inputs(A, B, scaling, G) -> None:
    for name, x in (("A", A), ("B", B), ("G", G)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            what = f"a {x.dim()}-D tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"alignment: {name} must be a 2-D tensor, got {what}")
    (r, n), (m, rb) = A.shape, B.shape
    if r == 0 or rb != r:
        raise ValueError(f"alignment: A is {tuple(A.shape)} and B is {tuple(B.shape)}; they must share a rank r >= 1 "
                         "(A (r, d_in), B (d_out, r))")
    if tuple(G.shape) != (m, n):
        raise ValueError(f"alignment: G is {tuple(G.shape)} but B A is {(m, n)}; pass the layer's (d_out, d_in) gradient")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"alignment: scaling must be a positive finite number, got {scaling!r}")
    for name, x in (("A", A), ("B", B), ("G", G)):
        if not torch.isfinite(x).all():
            raise ValueError(f"alignment: {name} has non-finite entries (NaN or inf)")


def alignment(A: torch.Tensor, B: torch.Tensor, scaling: float, G: torch.Tensor) -> Alignment:
    """First-step alignment of an adapter ``(A (r, n), B (m, r), s)`` with gradient ``G (m, n)``; float64.

    ``ValueError`` naming the argument for inputs that are not 2-D tensors, whose shapes do not chain
    (``B A`` must be ``G``'s shape), with rank 0, a scaling that is not a positive finite number, or
    non-finite entries."""
    _check_inputs(A, B, scaling, G)
    A, B, G = A.detach().double(), B.detach().double(), G.detach().double()
    r = A.shape[0]
    D = first_step_direction(A, B, scaling, G)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    k = min(2 * r, S.numel())
    G2r = (U[:, :k] * S[:k]) @ Vh[:k]
    total = S.square().sum()
    floor = math.sqrt(max(0.0, (S[k:].square().sum() / total).item())) if total > 0 else 0.0
    nd, ng = D.norm(), G.norm()
    cosine = ((D * G).sum() / (nd * ng)).item() if nd > 0 and ng > 0 else 0.0
    n2r = G2r.square().sum()
    zeta = ((D * G2r).sum() / n2r).item() if n2r > 0 else 0.0
    return Alignment(rel_error=_sine(D, G), floor=floor, cosine=cosine, rel_error_2r=_sine(D, G2r), zeta=zeta, rank=r)


def adapted_alignment(model: nn.Module, data: Iterable, loss_fn: Callable | None = None, *,
                      num_batches: int | None = None, progress: bool = True) -> dict[str, Alignment]:
    """Alignment of every adapted layer of ``model`` at its current point.

    ``G = dL/dW_eff`` is estimated on ``data`` with hooks on each layer's base module (the base
    output's gradient is the layer output's), so this works at initialization or mid-training,
    for any adapter and initializer.
    """
    layers = dict(adapted_layers(model))
    if not layers:
        raise ValueError("the model has no lowrank adapters; call lowrank.inject first, or use "
                         "lowrank.theory.compare to evaluate initializers on an un-adapted model")
    _require_factors(layers)
    G = estimate_gradients(model, {name: layer.base_layer for name, layer in layers.items()}, data,
                           loss_fn or default_loss, num_batches=num_batches, progress=progress)
    return {name: alignment(*layer.factors(), layer.scaling, G[name]) for name, layer in layers.items()}


def _require_factors(layers: Mapping[str, Any]) -> None:
    bad = [n for n, layer in layers.items() if layer.factors() is None]
    if bad:
        raise ValueError(f"layer {bad[0]!r} has a {layers[bad[0]].registry_name!r} adapter without a trained (A, B) pair; "
                         "first-step alignment is defined for factor adapters (lora, dora)")


def init_factors(init: str, G: torch.Tensor, *, W0: torch.Tensor | None = None, rank: int, alpha: float = 16.0,
                 scaling: str = "rslora", init_options: Mapping[str, Any] | None = None,
                 seed: int = 0) -> tuple[InitResult, float]:
    """Run the registered initializer ``init`` on one synthetic ``(m, n)`` layer whose gradient is ``G``.

    ``W0`` defaults to ``N(0, 1/n)`` entries (seeded). Returns ``(InitResult, s)``. Data-driven
    initializers get ``G`` as their ``"gradient"`` statistic; ones that need other statistics
    raise a ``KeyError`` naming them.
    """
    m, n = G.shape
    from ..registry import get_adapter, get_initializer, list_adapters

    kinds = get_initializer(init).adapter_kinds  # an adapter it initializes, for the config's pairing check
    adapter = next(a for a in ["lora", *list_adapters()] if get_adapter(a).kind in kinds)
    cfg = LoRAConfig(rank=rank, alpha=alpha, scaling=scaling, targets=["layer"], init=init, adapter=adapter,
                     init_options=dict(init_options or {}), seed=seed)  # validates the names and options
    layer = nn.Linear(n, m, bias=False, dtype=G.dtype)
    with torch.no_grad():
        if W0 is None:
            W0 = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=G.dtype) / math.sqrt(n)
        layer.weight.copy_(W0)
    spec = LayerSpec("layer", layer, rank, cfg.alpha_for("layer"), cfg.scaling_for("layer"))
    (res,) = run_initializer(cfg.make_initializer(), [spec], seed=seed, stats={"layer": {"gradient": G}})
    return res, spec.scaling


def gradients(model: nn.Module, config: LoRAConfig, data: Iterable, loss_fn: Callable | None = None, *,
              num_batches: int | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean gradient ``G`` (float32) of every layer ``config`` targets in the (un-adapted) ``model``."""
    targets = find_targets(model, config)
    return estimate_gradients(model, {t.name: t.module for t in targets}, data, loss_fn or default_loss,
                              num_batches=num_batches, progress=progress)


def compare(build_model: Callable[[], nn.Module], configs: Mapping[str, LoRAConfig], data: Iterable,
            loss_fn: Callable | None = None, *, num_batches: int | None = None,
            progress: bool = True) -> tuple[dict[str, dict[str, Alignment]], dict[str, torch.Tensor]]:
    """Alignment of every target layer for each labelled config, all on the same ``G`` (at ``W0``).

    ``build_model()`` must return a fresh copy of the same pretrained model each call. The configs
    must target the same layers. Returns ``({label: {layer: Alignment}}, G)``.
    """
    data = list(data)
    if num_batches is not None:
        if len(data) < num_batches:
            raise ValueError(f"data gave only {len(data)} batches but num_batches={num_batches}")
        data = data[:num_batches]  # the same batches for G and for the data-driven inits
    first = next(iter(configs.values()))
    G = gradients(build_model(), first, data, loss_fn, progress=progress)
    out: dict[str, dict[str, Alignment]] = {}
    for label, cfg in configs.items():
        model = build_model()
        inject(model, cfg, data=data if cfg.make_initializer().uses_data else None, loss_fn=loss_fn, progress=progress)
        layers = dict(adapted_layers(model))
        _require_factors(layers)
        if set(layers) != set(G):
            raise ValueError(f"config {label!r} targets other layers than {next(iter(configs))!r}; "
                             f"first difference: {sorted(set(layers) ^ set(G))[0]!r}")
        out[label] = {name: alignment(*layers[name].factors(), layers[name].scaling, G[name]) for name in G}
    return out, G
