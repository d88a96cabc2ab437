"""LoRA²: multi-scale low-rank approximations (Zhang et al. 2024, arXiv 2408.06854); the authors' code
``Godz-z/LoRA-2`` (``loralib/loralib/LoRA2.py``: ``SVDLinear``, ``RankAllocator``, ``compute_orth_regu``).

Two LoRAs in two planes, multiplied, with AdaLoRA's diagonal of ``r`` "singular values" between them::

    y = W x + b + c * B2 A2 diag(E) B1 A1 dropout(x)
    A1 (k, d_in), B1 (r, k)      the input plane  P1 = B1 A1 (r, d_in), rank <= k   (the authors' lora_A, lora_B)
    A2 (k, r), B2 (d_out, k)     the output plane P2 = B2 A2 (d_out, r), rank <= k  (the authors' lora_aa, lora_bb)
    E (r,)                     the triplet values, pruned by importance during training
    c = alpha / r (or rsLoRA's alpha / sqrt(r)): the layer's scale, with r the initial rank (never the pruned one)

``k`` (option, 8 in the authors' code and runs) is the inner rank of each plane. Initialization (the ``lora2``
initializer): ``E = 0`` and ``A1, B1, A2, B2 ~ N(0, 0.02^2)``, so the update is 0 at step 0 and only ``E`` moves in the
first step (AdaLoRA's scheme).

Orthogonality (:func:`lora2_loss`, added to the task loss): every factor pushed to orthonormal along its ``k``
side, ``R = ||A1 A1^T - I_k||_F + ||A2 A2^T - I_k||_F + ||B1^T B1 - I_k||_F + ||B2^T B2 - I_k||_F`` per layer, averaged
over the model's factor matrices and weighted by ``orth_coef`` (0.1; the authors' ``--reg_orth_coef``, 0.3 on RTE
and STS-B). The authors' function computes a cross-plane term it never uses (and as published fails to run);
lowrank keeps the per-factor terms that work.

Pruning (:class:`LoRA2Pruner`, AdaLoRA's schedule): sensitivity ``I = |p ⊙ dL/dp|`` of ``E``, ``B1`` and ``A2`` (the
factors next to ``E``: the paper's cheaper importance), smoothed ``I' <- b1 I' + (1 - b1) I``, uncertainty
``U' <- b2 U' + (1 - b2) |I - I'|``, score ``s = I' U'``; triplet ``i`` scores ``S_i = s(E_i) + mean_j s(B1_ij) +
mean_j s(A2_ji)``. The budget falls from the total rank to ``target_rank`` per layer on the cubic schedule
``b(t) = target + (total - target) (1 - (t - t_i) / (T - t_f - t_i))^3`` (no masking before ``t_i``, the target from
``T - t_f``; masks every ``mask_interval`` steps, every step at the end); ``E_i`` of the triplets at or below the
budget's threshold is set to 0 (they may regrow between masks, as in AdaLoRA). The authors' per-task step counts
(``t_init``, ``t_final``) are fixed numbers; lowrank takes fractions of the run (``init_frac``, ``final_frac``).

No offset, no PEFT format (``lowrank.peft.export`` refuses it); merge folds ``c B2 A2 diag(E) B1 A1`` into ``W``
(the authors' merge has a shape error; this one is the formula above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_adapter
from ..weights import weight_dtype, weight_shape
from .base import Adapter


def _fraction(name: str, v: Any, lo_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1 if lo_open else 0 <= v < 1):
        raise ValueError(f"invalid {name}={v!r}: must be a number in {'(0, 1)' if lo_open else '[0, 1)'}")


@register_adapter("lora2")
class LoRA2Layer(Adapter):
    """LoRA² (arXiv 2408.06854): two low-rank planes multiplied, ``c B2 A2 diag(E) B1 A1``, E pruned by importance."""

    kind = "lora2"
    default_init = "lora2"

    @dataclass(frozen=True)
    class Options:
        k: int = 8
        """Inner rank of each plane (the authors' code: 8)."""
        orth_coef: float = 0.1
        """Weight of the orthogonality term in :func:`lora2_loss` (the authors' ``reg_orth_coef``)."""
        target_rank: int | None = None
        """Pruning: the mean number of triplets kept per layer at the end (``None``: no pruning)."""
        init_frac: float = 0.1
        """Pruning: no masking in the first ``init_frac`` of the steps (AdaLoRA's ``t_init``)."""
        final_frac: float = 0.2
        """Pruning: the budget reaches ``target_rank`` at ``1 - final_frac`` of the steps (``t_final``)."""
        mask_interval: int = 10
        """Pruning: steps between masks while the budget falls."""
        beta1: float = 0.85
        """Pruning: smoothing of the sensitivity."""
        beta2: float = 0.85
        """Pruning: smoothing of the uncertainty."""

        def __post_init__(self):
            for key in ("k", "mask_interval"):
                v = getattr(self, key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"invalid {key}={v!r}: must be a positive integer")
            if isinstance(self.orth_coef, bool) or not isinstance(self.orth_coef, (int, float)) or not (
                    math.isfinite(self.orth_coef) and self.orth_coef >= 0):
                raise ValueError(f"invalid orth_coef={self.orth_coef!r}: a finite number >= 0")
            if self.target_rank is not None and (isinstance(self.target_rank, bool)
                                                 or not isinstance(self.target_rank, int) or self.target_rank < 1):
                raise ValueError(f"invalid target_rank={self.target_rank!r}: a positive integer or None")
            for key in ("init_frac", "final_frac"):
                _fraction(key, getattr(self, key))
            if self.init_frac + self.final_frac >= 1:
                raise ValueError(f"init_frac + final_frac = {self.init_frac + self.final_frac:g} leaves no steps for the "
                                 "budget to fall; keep their sum below 1")
            for key in ("beta1", "beta2"):
                _fraction(key, getattr(self, key), lo_open=True)

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 options: Any = None):
        super().__init__(options)
        if not self.supports(base_layer):
            raise TypeError(f"LoRA2Layer cannot wrap {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.d_out, self.d_in = weight_shape(base_layer)
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(scaling)
        k, dt, dev = self.options.k, weight_dtype(base_layer), base_layer.weight.device
        self.A1 = nn.Parameter(torch.zeros(k, self.d_in, dtype=dt, device=dev))
        self.B1 = nn.Parameter(torch.zeros(self.rank, k, dtype=dt, device=dev))
        self.E = nn.Parameter(torch.zeros(self.rank, dtype=dt, device=dev))
        self.A2 = nn.Parameter(torch.zeros(k, self.rank, dtype=dt, device=dev))
        self.B2 = nn.Parameter(torch.zeros(self.d_out, k, dtype=dt, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def check_layer(cls, name: str, module: nn.Module, rank: int, options: Any) -> None:
        d_out, d_in = weight_shape(module)
        if options.k > min(d_out, d_in):
            raise ValueError(f"layer {name!r} ({d_out} x {d_in}): lora2's inner rank k={options.k} exceeds "
                             f"min(d_out, d_in) = {min(d_out, d_in)}; use adapter_options={{'k': {min(d_out, d_in)}}}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = F.linear(F.linear(self.dropout(x).to(self.A1.dtype), self.A1), self.B1) * self.E  # (..., r)
        return y + (F.linear(F.linear(h, self.A2), self.B2) * self.scaling).to(y.dtype)

    def planes(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P1, P2) = (B1 A1, B2 A2)``: ``(r, d_in)`` and ``(d_out, r)``."""
        dt = dtype or self.A1.dtype
        return self.B1.to(dt) @ self.A1.to(dt), self.B2.to(dt) @ self.A2.to(dt)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``c B2 A2 diag(E) B1 A1`` as ``(d_out, d_in)``."""
        dt = dtype or self.A1.dtype
        P1, P2 = self.planes(dt)
        return self.scaling * (P2 * self.E.to(dt)) @ P1

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A1": self.A1, "B1": self.B1, "E": self.E, "A2": self.A2, "B2": self.B2}

    def orthogonality(self) -> tuple[torch.Tensor, int]:
        """``(sum of the four ||P P^T - I_k||_F terms, 4)`` in float32 (float64 for float64 factors)."""
        dt = torch.promote_types(self.A1.dtype, torch.float32)
        eye = torch.eye(self.options.k, dtype=dt, device=self.A1.device)
        A1, B1, A2, B2 = (t.to(dt) for t in (self.A1, self.B1, self.A2, self.B2))
        terms = [A1 @ A1.T, A2 @ A2.T, B1.T @ B1, B2.T @ B2]
        return sum(torch.linalg.matrix_norm(g - eye) for g in terms), len(terms)

    @torch.no_grad()
    def initialize(self, result) -> torch.Tensor | None:
        """The four factors and ``E`` from ``result.extras`` (the ``lora2`` initializer's); ``result.A`` / ``.B`` are
        the planes ``B1 A1`` and ``B2 A2``."""
        missing = [k for k in ("A1", "B1", "E", "A2", "B2") if k not in result.extras]
        if missing:
            raise ValueError(f"the lora2 adapter needs its factors {missing} in InitResult.extras (the 'lora2' "
                             "initializer returns them)")
        if result.offset:
            raise ValueError("the lora2 adapter does not offset its base; use the 'lora2' initializer")
        for key, p in self.adapter_parameters().items():
            got = tuple(result.extras[key].shape)
            if got != tuple(p.shape):
                raise ValueError(f"lora2 factor {key} from the initializer has shape {got}, the adapter's is "
                                 f"{tuple(p.shape)}: give the initializer the adapter's inner rank, "
                                 f"init_options={{'k': {self.options.k}}}")
        for key, p in self.adapter_parameters().items():
            p.copy_(result.extras[key])
        return None

    def layer_info(self) -> dict[str, Any]:
        return {"k": self.options.k}

    @classmethod
    def training_hook(cls, model: nn.Module, total_steps: int):
        """:class:`LoRA2Pruner` when the layers' ``target_rank`` is set (pruning on), else ``None``."""
        layer = next((m for m in model.modules() if isinstance(m, cls)), None)
        return LoRA2Pruner(model, total_steps) if layer is not None and layer.options.target_rank else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.adapter_parameters().items()}

    @classmethod
    def tensor_shapes(cls, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        k = info.get("k", cls.Options.k)
        r, m, n = info["rank"], info["d_out"], info["d_in"]
        return {"A1": (k, n), "B1": (r, k), "E": (r,), "A2": (k, r), "B2": (m, k)}

    @classmethod
    def init_result(cls, tensors: dict[str, torch.Tensor]):
        from .base import InitResult

        P1, P2 = tensors["B1"] @ tensors["A1"], tensors["B2"] @ tensors["A2"]
        return InitResult(A=P1, B=P2, extras=dict(tensors))

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, p in self.adapter_parameters().items():
            p.copy_(tensors[key])

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, k={self.options.k}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")


def lora2_loss(model: nn.Module, coef: float | None = None) -> torch.Tensor:
    """LoRA²'s orthogonality term, ``coef * (sum over the layers' factor matrices of ||P P^T - I_k||_F) / (their
    number)``, a differentiable float32 scalar to add to the task loss; ``coef`` defaults to the layers'
    ``orth_coef`` (the first layer's)."""
    layers = [m for m in model.modules() if isinstance(m, LoRA2Layer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no lora2 adapter layers; inject with LoRAConfig(adapter='lora2')")
    coef = layers[0].options.orth_coef if coef is None else coef
    total, count = 0.0, 0
    for layer in layers:
        t, n = layer.orthogonality()
        total, count = total + t.float(), count + n
    return coef * total / count


class LoRA2Pruner:
    """LoRA²'s importance-based pruning of the triplet values ``E`` (module docstring): ``step()`` after every
    optimizer step (the factors' ``.grad`` still set), for ``total_steps`` steps."""

    def __init__(self, model: nn.Module, total_steps: int):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRA2Layer)}
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no lora2 adapter layers to prune")
        self.options = next(iter(self.layers.values())).options
        o = self.options
        if o.target_rank is None:
            raise ValueError("lora2 pruning needs adapter_options={'target_rank': ...} (the triplets kept per layer)")
        self.total_steps = int(total_steps)
        self.t_init = round(o.init_frac * self.total_steps)
        self.t_final = round(o.final_frac * self.total_steps)
        if self.total_steps - self.t_final - self.t_init < 1:
            raise ValueError(f"lora2 pruning over {total_steps} steps leaves no steps between t_init={self.t_init} "
                             f"and T - t_final={self.total_steps - self.t_final}; train longer or lower the fractions")
        self.total_rank = sum(m.rank for m in self.layers.values())
        self.target = min(self.total_rank, o.target_rank * len(self.layers))
        self.ipt: dict[str, dict[str, torch.Tensor]] = {}
        self.unc: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0

    def budget(self, t: int) -> tuple[int, bool]:
        """``(budget, mask now)`` at step ``t`` (AdaLoRA's cubic schedule)."""
        T, ti, tf = self.total_steps, self.t_init, self.t_final
        if t <= ti:
            return self.total_rank, False
        if t > T - tf:
            return self.target, True
        frac = 1 - (t - ti) / (T - tf - ti)
        return int(self.target + (self.total_rank - self.target) * frac ** 3), t % self.options.mask_interval == 0

    @torch.no_grad()
    def _update(self) -> None:
        b1, b2 = self.options.beta1, self.options.beta2
        for name, layer in self.layers.items():
            for key in ("E", "B1", "A2"):
                p = getattr(layer, key)
                if p.grad is None:
                    continue
                now = (p * p.grad).abs().float()
                ipt = self.ipt.setdefault(name, {}).setdefault(key, torch.zeros_like(now))
                unc = self.unc.setdefault(name, {}).setdefault(key, torch.zeros_like(now))
                ipt.mul_(b1).add_(now, alpha=1 - b1)
                unc.mul_(b2).add_((now - ipt).abs(), alpha=1 - b2)

    def scores(self) -> dict[str, torch.Tensor]:
        """Per layer, the ``(r,)`` triplet scores ``s(E_i) + mean_j s(B1_ij) + mean_j s(A2_ji)``."""
        out = {}
        for name, layer in self.layers.items():
            s = {k: self.ipt[name][k] * self.unc[name][k] for k in self.ipt[name]} if name in self.ipt else None
            out[name] = (torch.zeros(layer.rank) if s is None or len(s) < 3
                         else s["E"] + s["B1"].mean(dim=1) + s["A2"].mean(dim=0))
        return out

    @torch.no_grad()
    def step(self) -> int | None:
        """One optimizer step done: update the importance (while ``t < T - t_final``) and mask ``E`` when the
        schedule says; returns the budget applied, or ``None`` when nothing was masked."""
        self.steps += 1
        t = self.steps
        if t < self.total_steps - self.t_final:
            self._update()
        budget, mask = self.budget(t)
        if not mask or budget >= self.total_rank:
            return None
        scores = self.scores()
        flat = torch.cat([s.flatten().cpu() for s in scores.values()])
        threshold = torch.kthvalue(flat, self.total_rank - budget).values
        for name, layer in self.layers.items():
            layer.E.masked_fill_((scores[name] <= threshold).to(layer.E.device), 0.0)
        return budget


LoRA2Layer.auxiliary_loss = staticmethod(lora2_loss)
