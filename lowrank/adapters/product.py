"""The LoRA product ``s * B A drop(x)`` computed the cheapest way for its shapes (after RunLoRA, Cherniuk et al.
2023, arXiv 2312.03415: the same mathematics, a different order of products and a different choice of what is
kept for backward).

Notation: ``x`` is ``(N, n)`` (``N`` tokens, ``n = d_in``), ``A`` ``(r, n)``, ``B`` ``(m, r)`` (``m = d_out``),
dropout rate ``p``, ``c = 1 / (1 - p)``, ``M`` the Bernoulli(``1 - p``) keep mask, ``x~ = c M * x``::

    y = s x~ A^T B^T            dB = s g^T h,   h = x~ A^T          (g = dL/dy, (N, m))
    dA = s (g B)^T x~           dx = c M * (s (g B) A)

**Dropout without copies.** ``nn.Dropout`` (and PEFT) keep a dropped float copy of ``x`` for every projection
that reads it, ``4 N n`` bytes each (seven per decoder block), and draw ``N n`` Bernoulli variables for it.
Here the dropped positions are drawn as a Bernoulli process (independent Geometric(``p``) gaps between drops,
so each entry is dropped independently with probability ``p``; ``~pNn`` draws instead of ``Nn``) from the
device's default generator (``torch.manual_seed`` fixes the masks). The dropped copy ``x~`` is a temporary of
the forward, freed once ``h = x~ A^T`` is computed; backward rebuilds it from ``x`` and the positions. What
backward keeps is what the dropout-free layer keeps (``x``, shared with every other reader of the same input,
``h``, ``A``, ``B``) plus the positions as int32: ``4p`` bytes per entry of ``x`` (0.2 at ``p = 0.05``, 5% of a
float copy).

**Product order.** Two orders, chosen per call from the shapes by :func:`choose_order` (multiply-adds)::

    factored: y = (s x~ A^T) B^T     Nr(n + m)            dx = (c sgB) A      Nrn
    dense:    y = x~ (B sA)^T        mnr + Nmn            dx = g (B csA)      mnr + Nmn

(scalars ride on the smallest operand). ``gB`` (``Nmr``), ``dA = (sgB)^T x~`` (``Nrn``) and ``dB = s g^T h``
(``Nmr``) are computed factored in both orders (their dense forms cost ``Nmn`` more); ``factored`` keeps ``h``
(``N r`` floats, computed anyway), ``dense`` recomputes it in backward (``Nnr``) rather than keep it. So
``dense`` wins only when ``r`` exceeds about ``2mn / (m + n)`` for many tokens (the widths' harmonic mean, at
least ``min(m, n)``): an over-wide adapter; every usual rank runs ``factored``.

Works on any device and dtype: the positions are drawn on ``x``'s device (checking that the gaps drawn cover
the tensor reads one scalar back, a synchronization on CUDA), the products run in ``x``'s dtype as ``F.linear``'s.
Only the CPU path is exercised by lowrank's tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ORDERS = ("factored", "dense")


def costs(tokens: int, d_in: int, d_out: int, rank: int) -> dict[str, int]:
    """Multiply-adds of the forward, ``dx`` and ``h`` per order (the module docstring's table; the rest of
    backward is the same in both)."""
    n, m, r, N = d_in, d_out, rank, tokens
    return {"factored": N * r * (n + m) + N * r * n, "dense": 2 * (m * n * r + N * m * n) + N * n * r}


def choose_order(tokens: int, d_in: int, d_out: int, rank: int) -> str:
    """The order with fewer multiply-adds (:func:`costs`); ``factored`` on a tie."""
    c = costs(tokens, d_in, d_out, rank)
    return "dense" if c["dense"] < c["factored"] else "factored"


def drop_positions(numel: int, p: float, device: torch.device, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Sorted flat indices (int64) in ``[0, numel)`` of the entries a Bernoulli(``p``) dropout drops.

    The gaps between successive drops are i.i.d. Geometric(``p``) on ``{1, 2, ...}`` (the law of the gaps of an
    i.i.d. Bernoulli(``p``) sequence), drawn by inversion, ``G = 1 + floor(log(v) / log(1 - p))`` for ``v = 1 - u``
    uniform on ``(0, 1]`` (``u`` a float32 ``torch.rand`` draw: each tail probability ``P(G > k) = (1 - p)^k``
    is met to the draw's resolution, ``2**-24``), from ``generator`` (default: the device's default one)."""
    mean, lq = numel * p, math.log1p(-p)
    k = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)

    def positions(start: int) -> torch.Tensor:
        u = torch.rand(k, device=device, generator=generator)
        return u.neg_().log1p_().div_(lq).floor_().long().add_(1).cumsum_(0).add_(start)

    pos = positions(-1)
    while int(pos[-1]) < numel:  # the last drop drawn must lie beyond the tensor (rare: ~1e-9 per call)
        pos = torch.cat([pos, positions(int(pos[-1]))])
    return pos[: int(torch.searchsorted(pos, numel))]  # sorted: a slice, not a mask


def dropped(x: torch.Tensor, pos: torch.Tensor | None, c: float) -> torch.Tensor:
    """``c M * x``: a new tensor, zero at the flat positions ``pos`` (``x`` itself when ``pos`` is None)."""
    if pos is None:
        return x
    xd = x * c
    xd.view(-1).index_fill_(0, pos, 0)
    return xd


SKINNY_RANK = 64
"""Below this rank the ``(N, r)`` and ``(m, r)`` results are computed as their transposes, ``r`` rows long
(``hT = A x~^T``, ``(gB)^T = B^T g^T``, ``dB^T = h^T g``): the same sums in another BLAS layout. Measured on a
2-core CPU (torch 2.13, float32, 1024 x 576 inputs, r = 8): ``g B`` 0.12 ms against 0.36 ms, ``dB`` 0.10 ms against
0.36 ms; at r = 128 the plain forms were as fast or up to 15% faster; bfloat16 ties except ``dB`` (2.5x)."""


class _LoRAProduct(torch.autograd.Function):
    """``s * B A drop(x)`` for ``x`` ``(N, n)``; see the module docstring for the rule and its counts."""

    @staticmethod
    def forward(ctx, x, A, B, scaling: float, p: float, order: str, generator):
        pos = drop_positions(x.numel(), p, x.device, generator) if p > 0 else None
        xd = dropped(x, pos, 1.0 / (1.0 - p))
        ctx.scaling, ctx.p, ctx.order, ctx.dropout = scaling, p, order, pos is not None
        kept = () if pos is None else (pos.to(torch.int32 if x.numel() < 2**31 else torch.int64),)
        if order == "dense":
            ctx.save_for_backward(x, A, B, *kept)
            return F.linear(xd, B @ (A * scaling))
        h = _x_at(xd, A)  # (N, r); xd is freed on return
        ctx.save_for_backward(x, A, B, *kept, h)
        return F.linear(h * scaling, B)  # s on the (N, r) side: one pass over (N, m) fewer

    @staticmethod
    def backward(ctx, gy):
        x, A, B = ctx.saved_tensors[:3]
        s, c = ctx.scaling, 1.0 / (1.0 - ctx.p)
        pos = ctx.saved_tensors[3].long() if ctx.dropout else None
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        xd = dropped(x, pos, c) if (need_a or (need_b and ctx.order == "dense")) else None
        skinny = A.shape[0] < SKINNY_RANK
        gh = (B.t() @ gy.t()).t() if skinny else gy @ B  # (N, r) = g B
        gh = gh * s
        dx = dA = dB = None
        if need_b:
            h = _x_at(xd, A) if ctx.order == "dense" else ctx.saved_tensors[-1]
            dB = ((h.t() @ gy).t() if skinny else gy.t() @ h) * s
        if need_a:
            dA = gh.t() @ xd
        if need_x:
            dx = gy @ (B @ (A * (s * c))) if ctx.order == "dense" else (gh * c) @ A
            if pos is not None:
                dx.view(-1).index_fill_(0, pos, 0)
        return dx, dA, dB, None, None, None, None


def _x_at(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``x A^T`` as ``(N, r)`` (a transposed view of ``A x^T`` below :data:`SKINNY_RANK`)."""
    return (A @ x.t()).t() if A.shape[0] < SKINNY_RANK else F.linear(x, A)


def lora_product(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float = 0.0,
                 order: str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``s * B A drop(x)`` as ``(..., d_out)`` for ``x`` ``(..., d_in)`` (module docstring: the rule, the counts).

    ``p``: the dropout rate (0: none); ``order``: ``"factored"`` / ``"dense"``, default :func:`choose_order`'s;
    ``generator``: the mask's random source, default the device's default generator (``torch.manual_seed``)."""
    if order is None:
        order = choose_order(x.numel() // max(x.shape[-1], 1), A.shape[1], B.shape[0], A.shape[0])
    elif order not in ORDERS:
        raise ValueError(f"invalid order={order!r}: one of {ORDERS}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"invalid dropout p={p!r}: must be in [0, 1)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = _LoRAProduct.apply(x2, A, B, float(scaling), float(p), order, generator)
    return y.reshape(*lead, B.shape[0])
