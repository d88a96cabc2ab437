"""LoRA-RITE (arXiv 2410.20625): its first step against an independent float64 derivation, the
invariance the paper claims (the sequence of ``s B A`` is the same from ``(A, B)`` and from
``(R A, B R^-1)``; plain AdamW's is not), state that round-trips and is checked on load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from lowrank.optim import PreconditionedOptimizer


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6)).double()


def data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randn(16, 6, generator=g, dtype=torch.float64))
            for _ in range(n)]


def adapted(transform=None, seed=0):
    model = mlp(seed)
    lowrank.inject(model, lowrank.LoRAConfig(rank=3, alpha=3, targets=["0", "2"], init="gaussian",
                                             init_options={"std": 0.3, "b_std": 0.3, "offset": False}, seed=seed))
    if transform is not None:  # the same function, another factorization: (R A, B R^-1)
        with torch.no_grad():
            for (_, layer), R in zip(lowrank.adapted_layers(model), transform):
                layer.A.copy_(R @ layer.A)
                layer.B.copy_(layer.B @ torch.linalg.inv(R))
    return model


def run(model, base, steps, **kw):
    opt = PreconditionedOptimizer(model, base=base, lr=0.05, **kw)
    seq = []
    for x, y in data(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        seq.append([layer.delta_weight().detach().clone() for _, layer in lowrank.adapted_layers(model)])
    return seq


def transforms(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.eye(3, dtype=torch.float64) + 0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)
            for _ in range(2)]


def max_rel(a, b):
    return max(((x - y).abs().max() / y.abs().max()).item() for sa, sb in zip(a, b) for x, y in zip(sa, sb))


@pytest.mark.parametrize("options", [{}, {"escape": True, "eps": 0.1}, {"clip": 0.0, "skip": 0.0, "b1": 0.0}])
def test_invariant_to_the_factorization_while_adamw_is_not(options):
    R = transforms()
    assert min(torch.linalg.svdvals(r).min().item() for r in R) > 0.1  # well-conditioned
    a = run(adapted(), "sgd", 8, preconditioner="lora_rite", **options)
    b = run(adapted(R), "sgd", 8, preconditioner="lora_rite", **options)
    assert max(x.abs().max().item() for s in a for x in s) > 0  # it trains
    assert max_rel(b, a) < 1e-9
    plain_a, plain_b = run(adapted(), "adamw", 8), run(adapted(R), "adamw", 8)
    assert max_rel(plain_b, plain_a) > 1e-3


def test_first_step_matches_an_independent_derivation():
    """At t = 1 (no transport, no decay): direction_A = R_B^-1 (g^ (g^T g^ / n)^-1/2)^T with g^ = s G^T Q_B."""
    model = adapted()
    x, y = data(1)[0]
    layer = model[0]
    A0, B0, s = layer.A.detach().numpy().copy(), layer.B.detach().numpy().copy(), layer.scaling
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="lora_rite", lr=1.0, eps=0.0, clip=0.0, skip=0.0)
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    gA, gB = layer.A.grad.numpy().copy(), layer.B.grad.numpy().copy()
    opt.step()

    def side(grad_t, other):  # grad_t: the factor's gradient laid out (rows, r); other: the factor giving the basis
        Q, Rm = np.linalg.qr(other)
        g = grad_t @ np.linalg.inv(Rm)
        V = g.T @ g / g.shape[0]
        w, W = np.linalg.eigh(V)
        return g @ (W / np.sqrt(w)) @ W.T, np.linalg.inv(Rm)

    MA, iRB = side(gA.T, B0)
    MB, iRA = side(gB, A0.T)
    np.testing.assert_allclose(A0 - layer.A.detach().numpy(), iRB @ MA.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(B0 - layer.B.detach().numpy(), MB @ iRA.T, rtol=1e-9, atol=1e-12)
    assert s > 0


def test_state_round_trips_and_a_state_for_another_model_is_refused():
    model = adapted()
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="lora_rite", lr=0.05)
    run_data = data(3)
    for x, y in run_data[:2]:
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    st = opt.state_dict()
    assert all(v.shape == (3, 3) for layer in st["layers"].values() for k, v in layer.items() if k.startswith("v_"))
    assert all(layer["step"].item() == 2 for layer in st["layers"].values())
    other = mlp()
    lowrank.inject(other, lowrank.LoRAConfig(rank=2, alpha=3, targets=["0", "2"], init="gaussian",
                                             init_options={"b_std": 0.3}))
    opt2 = PreconditionedOptimizer(other, base="sgd", preconditioner="lora_rite", lr=0.05)
    before = {k: v.clone() for k, v in opt2.state_dict()["layers"]["0"].items()}
    with pytest.raises(ValueError, match="nothing was loaded"):
        opt2.load_state_dict(st)
    assert all(torch.equal(v, before[k]) for k, v in opt2.state_dict()["layers"]["0"].items())
