"""The ``randlora`` adapter's initialization (RandLoRA, Albert et al. 2025, arXiv 2502.00987), drawn as PEFT 0.21
draws it (``RandLoraConfig(init_weights=True)``), so that one seed gives PEFT's bases bit for bit.

One pair of random bases serves every target layer, sized by the largest ``d_out`` (``m*``) and ``d_in`` (``n*``)
among them: ``d* = min(m*, n*)``, ``D* = max(m*, n*)``, ``N* = ceil(d* / r)``; from a CPU generator seeded with the
config's ``seed`` (PEFT's ``projection_prng_key``)::

    A* (r, 1, d*):  Kaiming-uniform (a = sqrt(5)) in bfloat16, then A* / std(A*)
    B* (D*, N*, r): N* Kaiming-uniform (D*, 1, r) draws in bfloat16, concatenated, then B* / std(B*)

``sparse`` (``very_sparse``) draws ``U[0, 1)`` float32 instead and keeps ``-1`` below ``1/(2 c)``, ``+1`` above
``1 - 1/(2 c)``, ``0`` between, with ``c = 3`` (``c = sqrt(d*)``), then divides by the std. Each layer
``(m, n)`` takes its slice ``basis_A = A*[:, 0, :d]``, ``basis_B = B*[:D, :N, :]`` (``d = min(m, n)``,
``D = max(m, n)``, ``N = ceil(d / r)``) and starts from ``lambda = 0`` (``(r, N)``) and
``gamma = 1 / max(N, d)`` (``(N, d)``), so the update is 0 and the output unchanged at step 0 (``lambda_std > 0``:
``lambda ~ N(0, lambda_std^2)`` from the layer's generator, and the output moves).

PEFT picks float16 instead of bfloat16 where ``accelerate`` reports no bfloat16 support; lowrank always draws in
bfloat16 (what PEFT does on any machine with bfloat16). The shared sizes need every target layer: they are
gathered by :meth:`RandLoRAInit.check_layer`, which every initialization path calls for all layers before the
first ``init_layer`` (``lowrank.init.driver.check_layers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.randlora import basis_shapes
from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext


def _ternary(u: torch.Tensor, c: float) -> torch.Tensor:
    """``-1`` where ``u < 1/(2c)``, ``+1`` where ``u > 1 - 1/(2c)``, else ``0``, divided by the std."""
    t = torch.zeros(u.shape)
    t[u < 1 / (2 * c)] = -1
    t[u > 1 - 1 / (2 * c)] = 1
    return t / t.std()


def shared_bases(d_out_max: int, d_in_max: int, rank: int, seed: int, sparse: bool = False,
                 very_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared ``(A* (r, 1, d*), B* (D*, N*, r))`` for targets whose largest dims are ``(d_out_max, d_in_max)``
    (module docstring), on the CPU; bfloat16 for the dense draw, float32 for the sparse ones."""
    n_bases, small, large = basis_shapes(rank, d_out_max, d_in_max)
    g = torch.Generator(device="cpu").manual_seed(seed)
    if sparse or very_sparse:
        c = math.sqrt(small) if very_sparse else 3.0
        A = torch.rand((rank, 1, small), generator=g)
        B = torch.rand((large, n_bases, rank), generator=g)
        return _ternary(A, c), _ternary(B, c)

    def kaiming(*shape: int) -> torch.Tensor:
        return torch.nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)

    A = kaiming(rank, 1, small)
    B = torch.cat([kaiming(large, 1, rank) for _ in range(n_bases)], dim=1)
    return A / A.std(), B / B.std()


@register_initializer("randlora")
class RandLoRAInit(Initializer):
    """RandLoRA (arXiv 2502.00987): PEFT's shared random bases from the seed; lambda = 0, gamma = 1/max(N, d)."""

    offset = False
    adapter_kinds = ("random_basis",)

    @dataclass(frozen=True)
    class Options:
        sparse: bool = False
        """Ternary bases, 1/6 each of -1 and +1 (PEFT's ``sparse``)."""
        very_sparse: bool = False
        """Ternary bases with ``1/sqrt(d*)`` each of -1 and +1 (PEFT's ``very_sparse``)."""
        lambda_std: float = 0.0
        """Standard deviation of ``lambda``'s entries (0: zeros, the output is unchanged; PEFT's
        ``init_weights=False`` draws ``N(0, 1)`` from the global RNG)."""

        def __post_init__(self):
            if self.sparse and self.very_sparse:
                raise ValueError("sparse and very_sparse are both set; choose one (very_sparse is the sparser)")
            if self.lambda_std < 0:
                raise ValueError(f"invalid lambda_std={self.lambda_std!r}: must be >= 0 (0: lambda = 0)")

    def __init__(self, **options):
        super().__init__(**options)
        self.preserves_output = self.options.lambda_std == 0
        self._shapes: dict[str, tuple[int, int]] = {}
        self._bases: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def check_layer(self, ctx: LayerContext) -> None:
        """Records the layer's ``(d_out, d_in)``: the shared bases are sized by all of them."""
        self._shapes[ctx.name] = (ctx.m, ctx.n)
        self._bases.clear()

    def init_layer(self, ctx: LayerContext) -> InitResult:
        if ctx.name not in self._shapes:
            raise RuntimeError(f"layer {ctx.name!r}: the randlora initializer sizes its shared bases from every target "
                               "layer, gathered by check_layer; run it through lowrank.inject (or "
                               "lowrank.init.driver.run_initializer), which checks every layer first")
        key = (ctx.rank, ctx.seed)
        if key not in self._bases:
            self._bases[key] = shared_bases(max(m for m, _ in self._shapes.values()),
                                            max(n for _, n in self._shapes.values()), ctx.rank, ctx.seed,
                                            self.options.sparse, self.options.very_sparse)
        A, B = self._bases[key]
        n_bases, small, large = basis_shapes(ctx.rank, ctx.m, ctx.n)
        std = self.options.lambda_std
        lam = std * torch.randn(ctx.rank, n_bases, generator=ctx.generator) if std else torch.zeros(ctx.rank, n_bases)
        extras = {"basis_A": A[:, 0, :small].float(), "basis_B": B[:large, :n_bases, :].float(), "lam": lam,
                  "gamma": torch.full((n_bases, small), 1.0 / max(n_bases, small))}
        return InitResult(A=ctx.zeros(ctx.rank, ctx.n), B=ctx.zeros(ctx.m, ctx.rank),  # unused: no A, B factors
                          extras={k: t.to(ctx.device) for k, t in extras.items()})
