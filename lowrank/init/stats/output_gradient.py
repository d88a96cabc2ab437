"""``"output_gradient_moment"``: the per-unit second moment of the loss gradient at a layer's output.

K-FAC's output factor, diagonal (LoRA-DA's ``Y_fisher``, arXiv 2510.24561): for every output unit ``i``,

    q_i = (1/N) sum_t g_{t,i}^2,     g_t = dL_b/dy_t  (the row of batch b's loss gradient at token t)

with ``N`` the layer's non-padding input rows over all batches (the ``rows`` of ``"covariance"``). The sum runs over
every row the backward reaches: padding rows, whose outputs the loss does not see, have ``g = 0`` and add nothing
(the pass does not hand a statistic the mask in the backward, so a model whose loss does read padded outputs would
count them in the sum, not in ``N``).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...weights import weight_shape
from ...registry import register_statistic
from .base import LayerInput, Statistic


@register_statistic("output_gradient_moment")
class OutputGradientMoment(Statistic):
    """``q = sum_t g_t^2 / N`` float32 ``(d_out,)``: the diagonal of ``E[g g^T]``, ``g = dL/dy`` per token row."""

    uses_backward = True
    provides = ("output_gradient_moment", "output_rows")

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device, offload: bool = False):
        self.square = {n: torch.zeros(weight_shape(m)[0], dtype=torch.float32, device=device)
                       for n, m in modules.items()}
        self.sums = [self.square]
        self.counts = torch.zeros(len(modules), dtype=torch.int64)
        self.index = {n: i for i, n in enumerate(modules)}

    def on_input(self, name: str, inp: LayerInput) -> None:
        self.counts[self.index[name]] += inp.rows.shape[0]

    def hold(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(0)  # nothing of the input is needed (a view would keep its storage alive)

    def on_gradient(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        acc = self.square[name]
        acc.add_(g.square().sum(0).to(acc.device))

    def reached(self, name: str) -> bool:
        return bool(self.counts[self.index[name]] > 0) and bool(self.square[name].any())

    def result(self, name: str, n_batches: int) -> dict[str, torch.Tensor]:
        N = int(self.counts[self.index[name]])
        return {"output_gradient_moment": self.square[name].div_(N), "output_rows": torch.tensor(N)}
