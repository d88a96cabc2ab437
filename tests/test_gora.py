"""GoRA (arXiv 2502.12171) against a float64 reference: importance, rank allocation, and B as the
least-squares fit of -G through A with the paper's scale."""

from __future__ import annotations

import math

import pytest
import torch

import lowrank
from lowrank import LoRAConfig
from lowrank.init.gradient import estimate_gradients

from .conftest import MODELS, batches

KIND = "llama"  # q_proj 32x32, v_proj 16x32, down_proj 32x48: unequal shapes


def _setup(rank=4, gamma=0.05, alpha=8.0):
    factory, targets, _, _ = MODELS[KIND]
    data = batches(KIND, 3)
    model = factory()
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(targets))}
    G = estimate_gradients(model, {n: model.get_submodule(n) for n in W0}, data, lowrank.default_loss, progress=False)
    cfg = LoRAConfig(targets=targets, rank=rank, alpha=alpha, scaling="rslora", init="gora",
                     init_options={"gamma": gamma, "progress": False})
    lowrank.inject(model, cfg, data=data, progress=False)
    return model, W0, G, cfg


def test_ranks_follow_importance_over_sqrt_dims_within_the_paper_bounds():
    model, W0, G, cfg = _setup()
    ranks = lowrank.rank_allocation(model)
    L = len(ranks)
    assert sum(ranks.values()) == 4 * L  # the budget: r times the number of targets
    imp = {n: (W0[n].double() * G[n].double()).abs().mean().item() for n in W0}
    a = {n: imp[n] / sum(imp.values()) for n in imp}
    w = {n: a[n] / math.sqrt(sum(W0[n].shape)) for n in a}
    for n, r in ranks.items():
        assert 2 <= r <= min(16, *W0[n].shape)  # [0.5 r, 4 r], capped by the shape
    # Water-filling reference: r_n = clip(lam w_n, 2, hi_n) with lam solving sum = budget, then rounding;
    # each rank is within one of its continuous share.
    hi = {n: min(16, *W0[n].shape) for n in W0}
    lo_l, hi_l = 0.0, 1e9
    for _ in range(200):
        lam = (lo_l + hi_l) / 2
        total = sum(min(max(lam * w[n], 2), hi[n]) for n in w)
        lo_l, hi_l = (lam, hi_l) if total < 4 * L else (lo_l, lam)
    for n in ranks:
        assert abs(ranks[n] - min(max(lam * w[n], 2), hi[n])) < 1 + 1e-6, (n, ranks[n])
    assert len(set(ranks.values())) > 1


def test_b_is_the_least_squares_fit_of_minus_g_with_the_paper_scale():
    model, W0, G, cfg = _setup(gamma=0.05, alpha=8.0)
    for name, layer in lowrank.adapted_layers(model):
        A, B = layer.A.detach().double(), layer.B.detach().double()
        r, n = A.shape
        assert layer.scaling == pytest.approx(8.0 / math.sqrt(r))  # rsLoRA at the layer's own rank
        P = A.T @ torch.linalg.inv(A @ A.T) @ A  # projection onto row(A)
        want = -0.05 * math.sqrt(n / r) * G[name].double() @ P
        torch.testing.assert_close(layer.scaling * B @ A, want, rtol=1e-5, atol=1e-7 * want.abs().max().item())
        # B minimizes ||s B A + gamma sqrt(n / r) G||_F: the residual is orthogonal to row(A)
        resid = layer.scaling * B @ A + 0.05 * math.sqrt(n / r) * G[name].double()
        assert (resid @ A.T).abs().max() < 1e-6 * resid.abs().max() * A.abs().max() * n
        assert torch.equal(layer.base_weight(), W0[name])  # no offset: the init is a step
        bound = 1 / math.sqrt(n)
        assert A.abs().max() <= bound  # kaiming-uniform


def test_the_init_step_lowers_the_loss():
    factory, targets, _, _ = MODELS[KIND]
    data = batches(KIND, 3)
    model = factory()
    with torch.no_grad():
        before = sum(model(**b).loss.item() for b in data)
    cfg = LoRAConfig(targets=targets, rank=4, alpha=8, scaling="rslora", init="gora",
                     init_options={"gamma": 0.05, "progress": False})
    lowrank.inject(model, cfg, data=data, progress=False)
    with torch.no_grad():
        after = sum(model(**b).loss.item() for b in data)
    assert after < before  # -G, the paper's sign (the authors' code fits +G)


def test_fixed_ranks_and_bad_options():
    factory, targets, _, _ = MODELS[KIND]
    cfg = LoRAConfig(targets=targets, rank=2, scaling="rslora", init="gora",
                     init_options={"allocate_ranks": False, "progress": False})
    model = lowrank.inject(factory(), cfg, data=batches(KIND, 2), progress=False)
    assert set(lowrank.rank_allocation(model).values()) == {2}
    with pytest.raises(ValueError, match="invalid gamma=0"):
        LoRAConfig(targets=targets, init="gora", init_options={"gamma": 0})
    with pytest.raises(ValueError, match="rank_min_factor=5 > rank_max_factor=4"):
        LoRAConfig(targets=targets, init="gora", init_options={"rank_min_factor": 5})
