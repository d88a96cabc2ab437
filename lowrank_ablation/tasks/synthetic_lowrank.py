"""``synthetic-lowrank``: a random two-layer "pretrained" MLP whose fine-tuning target is a known rank-``k``
change of both weights; mean-squared error. Fast: for CI and for theory at scale."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import Built, Task, positive, register_task, restoring_modes


@dataclass
class _Out:
    loss: torch.Tensor
    logits: torch.Tensor


class _MLP(nn.Module):
    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x, y=None):
        out = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        return _Out(loss=None if y is None else (out - y).pow(2).mean(), logits=out)


@register_task("synthetic-lowrank")
class SyntheticLowRank(Task):
    """Pretrained ``f0``; target ``f*`` = ``f0`` with ``W_l + shift * U_l V_l^T / sqrt(k n)`` (rank ``k``) on both
    layers; mean-squared error on fresh Gaussian inputs."""

    @dataclass(frozen=True)
    class Options:
        d_in: int = 64
        hidden: int = 128
        d_out: int = 32
        true_rank: int = 4
        shift: float = 1.0
        n_val: int = 512
        n_test: int = 1024
        init_batches: int = 4
        data_seed: int = 0

        def __post_init__(self):
            positive(self, "d_in", "hidden", "d_out", "true_rank", "n_val", "n_test", "init_batches")

    metrics = {"loss": "min"}
    headline = "loss"
    units = {"loss": "mean squared error"}
    example = "inputs"

    def __init__(self, options):
        super().__init__(options)
        o = options
        g = torch.Generator().manual_seed(o.data_seed)
        self.base = _MLP(o.d_in, o.hidden, o.d_out)
        with torch.no_grad():
            for lin in (self.base.fc1, self.base.fc2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
                lin.bias.zero_()
        self.teacher = _MLP(o.d_in, o.hidden, o.d_out)
        self.teacher.load_state_dict(self.base.state_dict())
        k = o.true_rank
        with torch.no_grad():
            for lin in (self.teacher.fc1, self.teacher.fc2):
                m, n = lin.weight.shape
                U, V = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
                lin.weight.add_(o.shift * U @ V.T / math.sqrt(k * n))
        self.val_x = torch.randn(o.n_val, o.d_in, generator=g)
        self.test_x = torch.randn(o.n_test, o.d_in, generator=g)

    def _batch(self, x):
        with torch.no_grad():
            return {"x": x, "y": self.teacher(x).logits}

    def build(self, seed: int, batch_size: int) -> Built:
        o = self.options
        model = _MLP(o.d_in, o.hidden, o.d_out)
        model.load_state_dict(self.base.state_dict())
        g = torch.Generator().manual_seed(seed)

        def stream():
            while True:
                yield self._batch(torch.randn(batch_size, o.d_in, generator=g))
        gi = torch.Generator().manual_seed(seed + 10_000)
        init = [self._batch(torch.randn(batch_size, o.d_in, generator=gi)) for _ in range(o.init_batches)]
        return Built(model=model, targets=["fc1", "fc2"], head=[], train=stream(), init_batches=init,
                     val_batches=[self._batch(x) for x in self.val_x.split(256)],
                     test_batches=[self._batch(x) for x in self.test_x.split(256)])

    def evaluate(self, model, batches, progress: bool = False) -> dict[str, float]:
        total, loss = 0, 0.0
        with restoring_modes(model), torch.no_grad():
            for b in batches:
                loss += model(**b).loss.item() * len(b["x"])
                total += len(b["x"])
        return {"loss": loss / total}

    @classmethod
    def describe(cls, options) -> str:
        o = options
        return f"synthetic rank-{o.true_rank} shift, MLP {o.d_in}-{o.hidden}-{o.d_out}"
