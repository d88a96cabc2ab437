"""``"covariance"`` and ``"input_svd"``: the second moment and mean of a layer's input rows."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...weights import weight_shape
from ...registry import register_statistic
from .base import LayerInput, Statistic

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


@register_statistic("covariance")
class InputMoments(Statistic):
    """``C = X^T X / N`` float32 ``(d_in, d_in)``, ``input_mean`` ``(d_in,)`` and ``rows`` ``N`` of the layer's input
    rows ``X`` over all batches (CorDA's statistic; EVA's ``input_svd`` factorizes the same sums at the end)."""

    provides = ("covariance", "input_mean", "rows")

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device, offload: bool = False):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
        self.gram = {n: zeros(weight_shape(m)[1], weight_shape(m)[1]) for n, m in modules.items()}
        self.xsum = {n: zeros(weight_shape(m)[1]) for n, m in modules.items()}
        self.sums = [self.gram, self.xsum]
        self.counts = torch.zeros(len(modules), dtype=torch.int64)
        self.index = {n: i for i, n in enumerate(modules)}

    def on_input(self, name: str, inp: LayerInput) -> None:
        device = self.gram[name].device
        self.gram[name].add_(inp.memo("upper_gram", upper_gram).to(device))
        self.xsum[name].add_(inp.memo("sum", lambda x: x.sum(0)).to(device))
        self.counts[self.index[name]] += inp.rows.shape[0]

    def reached(self, name: str) -> bool:
        return bool(self.counts[self.index[name]] > 0)

    def result(self, name: str, n_batches: int) -> dict[str, torch.Tensor]:
        N = int(self.counts[self.index[name]])
        return {"covariance": symmetrize_(self.gram[name]).div_(N), "input_mean": self.xsum[name].div_(N),
                "rows": torch.tensor(N)}


register_statistic("input_svd", InputMoments)  # the same sums, factorized by lowrank.init.collect.input_svd
