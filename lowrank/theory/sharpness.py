"""Sharpness: the largest-magnitude eigenvalue of the loss Hessian over the trainable parameters.

For ``L(theta)`` the mean loss over a few batches and ``theta`` the trainable parameters (after
``lowrank.inject``: the adapters and any trainable head), ``H = d^2 L / d theta^2``. Gradient
descent on the quadratic model is stable while ``lr * lambda_max(H) < 2``; adaptive methods settle
near the same edge for the preconditioned Hessian (Cohen et al. 2021, arXiv 2103.00065; Cohen et
al. 2022, arXiv 2207.14484). Adam's first, bias-corrected step is ``-lr g / (|g| + eps)``, i.e.
preconditioned by ``P = diag(|g| + eps)``, whose relevant curvature is the spectrum of
``P^{-1/2} H P^{-1/2}`` (the same as ``P^{-1} H``).

``H v`` comes from double backward (Pearlmutter 1994), never a dense ``H``; the eigenvalue from
Lanczos with full reorthogonalization (float64 Krylov basis, seeded start vector). Measured in
``eval()`` mode, so dropout does not make ``H`` random, with PyTorch's math attention kernel,
the one with a second derivative.

arXiv 2602.04998 reports ~100x higher sharpness for LoRA-GA and OLoRA than for vanilla LoRA on
Qwen3-0.6B, and ~18x lower best learning rates; ``docs/theory.md`` has our measurements.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..inject import default_loss

EPS = 1e-8
"""Adam's epsilon in ``P = diag(|g| + eps)``."""
PRECONDITIONERS = ("none", "adam")


class _Preserved:
    """Restores what a measurement may touch: ``.grad``, ``requires_grad``, train/eval modes, global RNG."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        m = self.model
        self.params = list(m.parameters())
        self.grads = [p.grad for p in self.params]
        self.flags = [p.requires_grad for p in self.params]
        self.modes = [mod.training for mod in m.modules()]
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return self

    def __exit__(self, *exc):
        for p, g, f in zip(self.params, self.grads, self.flags):
            p.grad = g
            p.requires_grad_(f)
        for mod, t in zip(self.model.modules(), self.modes):
            mod.training = t
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        return False


def _math_attention():
    """The math SDPA kernel: the fused CPU/CUDA kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch: the default already falls back where needed
        return contextlib.nullcontext()


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: call lowrank.inject(model, config) first, or set "
                         "requires_grad on the parameters whose Hessian you want")
    return params


def take_batches(data: Iterable, num_batches: int | None) -> list[Any]:
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    batches = list(data if num_batches is None else itertools.islice(data, num_batches))
    if not batches:
        raise ValueError("data gave no batches")
    if num_batches is not None and len(batches) < num_batches:
        raise ValueError(f"data gave only {len(batches)} batches but num_batches={num_batches}")
    return batches


def mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: Callable) -> torch.Tensor:
    """Mean over ``batches`` of ``loss_fn(model, batch)``; a non-finite loss is an error naming the batch."""
    total = None
    for i, b in enumerate(batches):
        loss = loss_fn(model, b)
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"non-finite loss {loss.item()} on batch {i}; the model was not changed. "
                                     "Check the data and the model's weights")
        total = loss if total is None else total + loss
    return total / len(batches)


class HessianOperator:
    """``v -> H v`` for the mean loss over ``batches`` w.r.t. ``params`` (flat float64 vectors).

    The first-order graph is built once and kept (``retain_graph``), so each product costs one extra
    backward pass; ``grad`` is the mean gradient ``g`` (flat, float64).
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], batches: Sequence[Any], loss_fn: Callable):
        self.params = list(params)
        self.loss = mean_loss(model, batches, loss_fn)
        grads = torch.autograd.grad(self.loss, self.params, create_graph=True, allow_unused=True)
        self.g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(self.params, grads)]
        self.grad = self.flat(self.g).detach().double()
        if not torch.isfinite(self.grad).all():
            raise FloatingPointError("non-finite gradient of the loss; the model was not changed")

    @staticmethod
    def flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for p in self.params:
            out.append(v[i:i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        return out

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        needs = [gi.requires_grad for gi in self.g]
        if not any(needs):  # the loss is linear in the parameters: H = 0
            return torch.zeros_like(v)
        hv = torch.autograd.grad([gi for gi, n in zip(self.g, needs) if n], self.params,
                                 grad_outputs=[vi for vi, n in zip(self.split(v), needs) if n],
                                 retain_graph=True, allow_unused=True)
        return self.flat([torch.zeros_like(p) if h is None else h for p, h in zip(self.params, hv)]).double()


def lanczos_extreme(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, iters: int, seed: int,
                    device: torch.device) -> float:
    """The Ritz value of largest magnitude (with its sign) after ``min(iters, n)`` Lanczos steps with full
    reorthogonalization, from a seeded Gaussian start vector (float64)."""
    k = min(iters, n)
    q = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    q /= q.norm()
    Q = torch.empty(k, n, dtype=torch.float64, device=device)
    alphas, betas = [], []
    for j in range(k):
        Q[j] = q
        w = matvec(q)
        a = torch.dot(w, q).item()
        alphas.append(a)
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)  # full reorthogonalization (twice is enough)
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = w.norm().item()
        if j == k - 1 or b <= 1e-12 * max(1.0, abs(a)):  # an invariant subspace: the Ritz values are exact
            break
        betas.append(b)
        q = w / b
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta = torch.linalg.eigvalsh(T)
    return theta[theta.abs().argmax()].item()


def sharpness(model: nn.Module, data: Iterable, loss_fn: Callable | None = None, *, num_batches: int = 1,
              preconditioner: str = "none", iters: int = 50, seed: int = 0) -> float:
    """The eigenvalue of largest magnitude (with its sign) of the Hessian of the mean loss over
    ``num_batches`` batches of ``data`` with respect to the model's trainable parameters.

    ``preconditioner="adam"`` gives it for ``P^{-1/2} H P^{-1/2}``, ``P = diag(|g| + 1e-8)`` with ``g``
    the mean gradient over the same batches (Adam's first, bias-corrected step). ``loss_fn(model, batch)``
    defaults to ``model(**batch).loss``. Deterministic under ``seed``; the model is left exactly as it was
    (parameters, ``.grad``, ``requires_grad``, train/eval modes, global RNG). Cost: one forward and
    backward with a kept graph, then ``iters`` Hessian-vector products.
    """
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {list(PRECONDITIONERS)}, got {preconditioner!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    params = [p for _, p in trainable(model)]
    batches = take_batches(data, num_batches)
    with _Preserved(model), _math_attention():
        model.eval()
        op = HessianOperator(model, params, batches, loss_fn or default_loss)
        if preconditioner == "adam":
            d = (op.grad.abs() + EPS).rsqrt()
            matvec = lambda v: d * op(d * v)  # noqa: E731
        else:
            matvec = op
        lam = lanczos_extreme(matvec, op.grad.numel(), iters, seed, op.grad.device)
    if not math.isfinite(lam):
        raise FloatingPointError(f"sharpness is not finite ({lam}); check the model's weights and the data")
    return lam
