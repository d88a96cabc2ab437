"""``"gradient"``: the mean over batches of each batch's gradient of its loss w.r.t. a layer's weight."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...weights import weight_shape
from ...registry import register_statistic
from .base import Statistic


@register_statistic("gradient")
class MeanGradient(Statistic):
    """``G = (1/N_b) sum_b dL_b/dW`` float32 ``(d_out, d_in)``, from the hooks' pieces ``g^T x``."""

    uses_backward = True
    provides = ("gradient",)

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device, offload: bool = False):
        self.offload = offload
        self.grad = {n: torch.zeros(weight_shape(m), dtype=torch.float32, device=device) for n, m in modules.items()}
        self.sums = [self.grad]

    def on_gradient(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        x = x.float()
        if self.offload:
            self.grad[name].add_((g.T @ x).cpu())
        else:  # in place: no (m, n) temporary
            self.grad[name].addmm_(g.T, x)

    def reached(self, name: str) -> bool:
        return bool(self.grad[name].any())

    def result(self, name: str, n_batches: int) -> dict[str, torch.Tensor]:
        return {"gradient": self.grad[name].div_(n_batches)}
