"""Scale stability: a coordinate check in the manner of mup, for an initializer + scaling.

Sweep the width (``m = d_out``, ``n = d_in``) and the rank ``r``; for each point build a
synthetic "pretrained" layer (``W0 ~ N(0, 1/n)``) in a one-layer model, fit a random linear
teacher with a mean-squared-error loss, inject the adapter with the public API (so any
registered initializer works, data-driven ones included), and measure per-coordinate second
moments under isotropic Gaussian inputs, where they are exact Frobenius norms::

    forward   E[(s B A x)_i^2]      = ||s B A||_F^2 / m     (x ~ N(0, I_n))
    backward  E[((s B A)^T g)_j^2]  = ||s B A||_F^2 / n     (g ~ N(0, I_m))
    update    E[(dW_t x)_i^2]       = ||W_eff(t) - W_eff(0)||_F^2 / m   after t optimizer steps

Theory (LoRA-GA, arXiv 2407.05000, Sec. 3.3; ``docs/theory.md``, section 3): with orthonormal factors
scaled by ``c = m^(1/4) / sqrt(gamma)`` (``scale="stable"``) and rsLoRA ``s = alpha / sqrt(r)``,
``forward = alpha^2 / gamma^2`` for every ``(m, n, r)`` and ``backward = alpha^2 m / (gamma^2 n)``;
with standard scaling ``s = alpha / r`` the forward moment decays like ``1 / r``.

    python -m experiments.coord_check --init lora_ga --plot docs/figures/coord_check.png
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import LoRAConfig
from ..inject import adapted_layers, inject
from ..registry import get_initializer


class _OneLayer(nn.Module):
    def __init__(self, m: int, n: int, generator: torch.Generator):
        super().__init__()
        self.layer = nn.Linear(n, m, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(m, n, generator=generator) / math.sqrt(n))

    def forward(self, x):
        return self.layer(x)


def _mse(model, batch):
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).mean()


def moments(delta: torch.Tensor) -> tuple[float, float]:
    """``(forward, backward)`` per-coordinate second moments of ``delta (m, n)`` under N(0, I) inputs."""
    sq = delta.double().square().sum().item()
    return sq / delta.shape[0], sq / delta.shape[1]


def scale_stability(init: str = "lora_ga", *, init_options: Mapping[str, Any] | None = None,
                    scaling: str = "rslora", alpha: float = 16.0, widths: Iterable[int] = (64, 128, 256, 512),
                    ranks: Iterable[int] = (2, 4, 8, 16), aspect: float = 1.0, steps: Iterable[int] = (0,),
                    lr: float = 1e-3, optimizer: str = "sgd", preconditioner: str = "identity",
                    batch_size: int = 64, num_batches: int = 2, seed: int = 0,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Coordinate-check table: one row per ``(m, n, r, step)``.

    ``m`` runs over ``widths``, ``n = round(aspect * m)``. ``steps`` are the optimizer steps at
    which to measure (0 = at initialization), with ``optimizer`` / ``preconditioner`` as in
    ``lowrank.optim.PreconditionedOptimizer`` at learning rate ``lr``. Each row holds
    ``forward``, ``backward`` and ``update`` (see the module docstring).
    """
    from ..optim import PreconditionedOptimizer

    init_cls = get_initializer(init)
    uses_data = init_cls.uses_data
    init_options = dict(init_options or {})
    if "progress" in {f.name for f in dataclasses.fields(init_cls.Options)}:
        init_options.setdefault("progress", False)  # one bar for the sweep, not one per point
    steps = sorted(set(steps))
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be non-negative integers, got {steps}")
    points = [(m, max(1, round(aspect * m)), r) for m in widths for r in ranks]
    rows = []
    for m, n, r in tqdm(points, desc=f"coordinate check {init}", disable=not progress, leave=False):
        g = torch.Generator().manual_seed(seed * 1_000_003 + m * 1009 + n * 17 + r)
        model = _OneLayer(m, n, g)
        teacher = model.layer.weight.detach() + torch.randn(m, n, generator=g) / math.sqrt(n)
        batches = []
        for _ in range(num_batches):
            x = torch.randn(batch_size, n, generator=g)
            batches.append((x, x @ teacher.T))
        cfg = LoRAConfig(rank=r, alpha=alpha, scaling=scaling, targets=["layer"], init=init,
                         init_options=init_options, seed=seed)
        inject(model, cfg, data=batches if uses_data else None, loss_fn=_mse, progress=False)
        layer = dict(adapted_layers(model))["layer"]
        w_eff0 = (layer.base_weight() + layer.delta_weight()).detach().double()
        opt = PreconditionedOptimizer(model, base=optimizer, preconditioner=preconditioner, lr=lr) if steps[-1] else None
        done = 0
        for t in steps:
            while done < t:
                opt.zero_grad()
                _mse(model, batches[done % len(batches)]).backward()
                opt.step()
                done += 1
            with torch.no_grad():
                delta = layer.delta_weight().detach()
                fwd, bwd = moments(delta)
                upd, _ = moments((layer.base_weight() + delta).double() - w_eff0)
            rows.append({"init": init, "scaling": scaling, "m": m, "n": n, "r": r, "step": t,
                         "forward": fwd, "backward": bwd, "update": upd,
                         "s": layer.scaling})
    return rows


def loglog_slope(xs: Iterable[float], ys: Iterable[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx = torch.tensor([math.log(x) for x in xs], dtype=torch.float64)
    ly = torch.tensor([math.log(y) for y in ys], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return (lx @ ly / (lx @ lx)).item()


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of ``scale_stability`` rows."""
    head = "| init | scaling | m | n | r | step | forward | backward | update |\n|---|---|---|---|---|---|---|---|---|"
    body = [f"| {r['init']} | {r['scaling']} | {r['m']} | {r['n']} | {r['r']} | {r['step']} | {r['forward']:.4g} | "
            f"{r['backward']:.4g} | {r['update']:.3g} |" for r in rows]
    return "\n".join([head, *body])


def plot(rows_by_label: Mapping[str, list[dict[str, Any]]], path: str, *, step: int = 0) -> None:
    """Log-log plot: forward moment vs width (left) and vs rank (right), one line per label and rank/width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in rows_by_label.items():
        rows = [r for r in rows if r["step"] == step]
        for rank in sorted({r["r"] for r in rows}):
            pts = sorted((r["m"], r["forward"]) for r in rows if r["r"] == rank)
            axes[0].plot(*zip(*pts), marker="o", label=f"{label}, r={rank}")
        widest = max(r["m"] for r in rows)
        pts = sorted((r["r"], r["forward"]) for r in rows if r["m"] == widest)
        axes[1].plot(*zip(*pts), marker="o", label=f"{label}, m={widest}")
    for ax, xl in zip(axes, ("width m (= n)", "rank r")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("E[(s B A x)_i^2] at init")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=7)
    fig.suptitle("Adapter output scale at initialization (coordinate check)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
