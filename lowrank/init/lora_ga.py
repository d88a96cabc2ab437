"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation.

Wang, Yu, Li 2024, arXiv 2407.05000, Algorithm 1 (the theorem it rests on: ``docs/theory.md``, section 2).

1. ``G = dL/dW`` at initialization, the mean over a few batches (``lowrank.init.gradient``).
2. ``G = U S V^T``; take the top ``2r`` triplets, split them into two disjoint index sets ``I_A``, ``I_B``.
3. ``A = c V[:, I_A]^T`` (``(r, d_in)``), ``B = c U[:, I_B]`` (``(d_out, r)``): pure singular vectors,
   both scaled by ``c`` (``stable``: ``c = m^(1/4) / sqrt(gamma)``; see ``lowrank.init.scale``).
4. ``W = W0 - s B A`` so the output is unchanged at step 0.

Then the first SGD step moves ``s B A`` by ``-lr s^2 (B B^T G + G A^T A) = -lr zeta G_2r`` with
``zeta = s^2 c^2``: the best rank-``2r`` approximation of the (scaled) first full fine-tuning step.
The paper uses rsLoRA, ``s = alpha / sqrt(r)``; with it and ``stable`` the output scale is
``alpha^2 / gamma^2`` per coordinate whatever the rank and width.

Directions (index sets over the top ``2r``): ``ArB2r`` (default) ``I_A = 0..r-1``, ``I_B = r..2r-1``;
``A2rBr`` the reverse; ``ArBr`` ``I_A`` odd, ``I_B`` even; ``random`` a seeded disjoint split.

Unlike PEFT's ``lora_ga``, ``B`` is not multiplied by singular values and both factors are
scaled, so the alignment theorem holds exactly; ``random`` never reuses an index.

``variant="peft"`` is PEFT's ``preprocess_loraga`` + ``get_peft_model`` (``LoraLayer.lora_ga_init``, PEFT 0.21 and 0.22), to
compare against "LoRA-GA in PEFT" inside one framework: the same ``G`` (the mean gradient over the batches), its
top ``2r`` triplets from ``torch.svd_lowrank(G, q=min(4r, m, n), niter=4)`` (seeded from the layer's generator,
the global RNG untouched; ``svd="full"`` takes the exact SVD instead), and

    A = V[:, I_A]^T,   B = U[:, I_B] diag(S[I_B]) * f,    W = W0 - s B A

with ``f = m^(1/4) / sqrt(gamma)`` (``stable``; ``m = d_out``, but ``d_in`` on a ``Conv1D`` layer before PEFT 0.22:
option ``peft_version``, default the installed PEFT's), ``sigma_1(W0) / S[I_B][0]`` (``weight``; PEFT's ``weight_svd``, the
first from ``svd_lowrank(W0, q=r, niter=4)``), 1 (``unit``); ``gd`` (PEFT's ``gd_scale``) divides ``A`` and ``B``
by ``s``. ``random`` draws one set of ``r`` indices for both (``I_A = I_B``), as PEFT does. Its first step is
``-lr s^2 (f^2 U_B S_B^2 U_B^T G + G V_A V_A^T)``, not proportional to ``G_2r`` (``docs/methods.md``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from importlib import metadata

import torch

from ..registry import register_initializer
from .base import InitResult, LayerContext
from .gradient import GradientInitializer, GradientOptions
from .scale import check_scale, scale_factor
from .svd import check_svd_options

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
VARIANTS = ("paper", "peft")


def split_indices(direction: str, r: int, generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """``(I_A, I_B)``: disjoint index sets of size ``r`` among the top ``2r`` singular triplets."""
    if direction == "ArB2r":
        return list(range(r)), list(range(r, 2 * r))
    if direction == "A2rBr":
        return list(range(r, 2 * r)), list(range(r))
    if direction == "ArBr":
        return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    if direction == "random":
        perm = torch.randperm(2 * r, generator=generator).tolist()
        return sorted(perm[:r]), sorted(perm[r:])
    raise ValueError(f"invalid direction {direction!r}: must be one of {DIRECTIONS}")


@register_initializer("lora_ga")
class LoRAGA(GradientInitializer):
    """LoRA-GA (arXiv 2407.05000): A, B from the SVD of the full-weight gradient, stable scale, offset base."""

    offset = True

    @dataclass(frozen=True)
    class Options(GradientOptions):
        direction: str = "ArB2r"
        """Split of the top 2r triplets: ``ArB2r``, ``A2rBr``, ``ArBr`` or ``random`` (seeded)."""
        scale: str = "stable"
        """Factor ``c`` on both A and B: ``stable``, ``gd``, ``unit`` or ``weight``."""
        stable_gamma: float = 16.0
        """``gamma`` of the stable scale ``c = m^(1/4) / sqrt(gamma)``."""
        svd: str = "auto"
        """``auto`` (exact up to 512 wide, randomized beyond), ``full`` (exact) or ``randomized`` (seeded block Krylov)."""
        oversample: int | None = None
        """Randomized SVD: block size 2r + oversample (None: 2r, a block of 4r)."""
        niter: int | None = None
        """Randomized SVD: Krylov depth (search space of (2r + oversample)(niter + 1) directions); default 4
        for ``svd="randomized"``, 2 for the layers ``svd="auto"`` factorizes randomized (first step within 1e-3
        of the Eckart-Young floor there, ``lowrank.init.svd.AUTO_FULL_MAX``)."""
        variant: str = "paper"
        """``paper`` (Algorithm 1, the theorem exact) or ``peft`` (PEFT's ``lora_ga``; module docstring)."""
        peft_version: str | None = None
        """``variant="peft"``: the PEFT release whose ``lora_ga`` to reproduce (``"0.21"``, ``"0.22.0"``, ...);
        ``None``: the installed PEFT's, or the newest behaviour known here when PEFT is not installed. Releases
        differ on GPT-2 ``Conv1D`` layers only (``docs/methods.md``)."""

        def __post_init__(self):
            super().__post_init__()
            if self.direction not in DIRECTIONS:
                raise ValueError(f"invalid direction={self.direction!r}: must be one of {DIRECTIONS}")
            check_scale(self.scale, self.stable_gamma)
            check_svd_options(self.svd, self.oversample, 0 if self.niter is None else self.niter)
            if self.variant not in VARIANTS:
                raise ValueError(f"invalid variant={self.variant!r}: must be one of {VARIANTS}")
            if self.variant == "peft" and self.estimator == "sketch":
                raise ValueError("variant='peft' factorizes the dense gradient as PEFT does; use estimator='dense' "
                                 "(the default) or variant='paper'")
            if self.peft_version is not None:
                peft_release(self.peft_version)  # validates
            if self.variant == "peft" and self.svd == "randomized":
                raise ValueError("variant='peft' takes PEFT's torch.svd_lowrank (svd='auto', the default) or the exact "
                                 "SVD (svd='full'); svd='randomized' is lowrank's own")

    _warned_scaling = False
    sketchable = True

    def triplets(self, rank: int) -> int:
        return 2 * rank

    def sketches(self) -> bool:
        return self.options.variant != "peft"  # PEFT's variant factorizes the dense gradient, as PEFT does

    def check_layer(self, ctx: LayerContext) -> None:
        super().check_layer(ctx)
        if 2 * ctx.rank > min(ctx.m, ctx.n):
            raise ValueError(f"lora_ga needs 2r <= min(d_out, d_in), but r={ctx.rank} and layer {ctx.name!r} is "
                             f"{ctx.m} x {ctx.n}; the largest valid rank is {min(ctx.m, ctx.n) // 2}")
        if not ctx.rslora and not self._warned_scaling:
            self._warned_scaling = True
            warnings.warn("lora_ga is defined with rsLoRA scaling (s = alpha / sqrt(r)); this layer's scale is "
                          f"{ctx.scaling:.4g} = alpha / r. Pass scaling='rslora' to follow the paper.", stacklevel=4)

    def init_layer(self, ctx: LayerContext) -> InitResult:
        if self.options.variant == "peft":
            return peft_factors(ctx, self.options)
        o, r = self.options, ctx.rank
        niter = o.niter if o.niter is not None else (2 if o.svd == "auto" else 4)
        U, _, V = ctx.gradient_svd(2 * r, method=o.svd, oversample=o.oversample, niter=niter,
                                   generator=ctx.generator)  # (m, 2r), (n, 2r)
        ia, ib = split_indices(o.direction, r, ctx.generator)
        c = scale_factor(o.scale, m=ctx.m, rank=r, scaling=ctx.scaling, gamma=o.stable_gamma,
                         weight=ctx.weight if o.scale == "weight" else None)
        A = c * V[:, ia].T  # (r, n)
        B = c * U[:, ib]  # (m, r)
        return InitResult(A=A.to(ctx.device), B=B.to(ctx.device), offset=True)


def _svd_lowrank(X: torch.Tensor, q: int, generator: torch.Generator):
    """``torch.svd_lowrank(X, q=q, niter=4)`` as PEFT calls it, its random draws seeded from ``generator`` (the
    global RNG is restored afterwards)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [X.device.index or 0] if X.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.svd_lowrank(X, q=q, niter=4)


PEFT_CONV1D_OUT_FEATURES = (0, 22)
"""The first PEFT release whose stable scale takes ``out_features`` on a ``Conv1D`` layer (0.21 and earlier take
the stored weight's first dimension, ``d_in``)."""


def peft_release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a PEFT version string (``"0.22.0"``, ``"0.21"``, ``"0.23.0.dev0"``)."""
    parts = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    if parts is None:
        raise ValueError(f"invalid peft_version={version!r}: expected a release such as '0.21' or '0.22.0'")
    return int(parts[1]), int(parts[2])


def installed_peft() -> str | None:
    """The installed PEFT's version, or ``None`` (read from the package metadata; PEFT is not imported)."""
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return None


def peft_stable_dim(ctx: LayerContext, version: str | None) -> int:
    """The ``m`` of PEFT's stable scale ``m^(1/4) / sqrt(gamma)``: ``d_out`` from PEFT 0.22 on; before, the stored
    weight's first dimension, which is ``d_in`` on a GPT-2 ``Conv1D`` layer (its weight is stored ``(d_in, d_out)``)."""
    version = version if version is not None else installed_peft()
    if version is None or peft_release(version) >= PEFT_CONV1D_OUT_FEATURES:
        return ctx.m
    return ctx.module.weight.shape[0]


def peft_factors(ctx: LayerContext, o) -> InitResult:
    """PEFT's ``lora_ga`` factors (module docstring, ``variant="peft"``)."""
    r, G = ctx.rank, ctx.gradient().float()  # (m, n)
    if o.svd == "full":
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        V = Vh.T
    else:
        U, S, V = _svd_lowrank(G, min(4 * r, *G.shape), ctx.generator)
    U, S, V = U[:, : 2 * r], S[: 2 * r], V[:, : 2 * r]
    if o.direction == "random":  # PEFT: one draw for both factors
        ia = ib = torch.randperm(2 * r, generator=ctx.generator)[:r].tolist()
    else:
        ia, ib = split_indices(o.direction, r)
    A, B, s_b = V[:, ia].T, U[:, ib] * S[ib], S[ib]  # (r, n), (m, r)
    if o.scale == "stable":
        B = B * (peft_stable_dim(ctx, o.peft_version) ** 0.25 / o.stable_gamma ** 0.5)
    elif o.scale == "weight":
        sigma = (torch.linalg.svdvals(ctx.weight.float())[:1] if o.svd == "full"
                 else _svd_lowrank(ctx.weight.float(), r, ctx.generator)[1])
        if s_b[0] > 0:
            B = B * (sigma[0] / s_b[0])
    elif o.scale == "gd":
        A, B = A / ctx.scaling, B / ctx.scaling
    return InitResult(A=A.to(ctx.device), B=B.to(ctx.device), offset=True)
