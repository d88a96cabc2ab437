"""LoFT (arXiv 2505.21289): steps against an independent float64 reference that keeps the moments in full size
(``m x n`` first moments, one ``m x m`` / ``n x n`` covariance per column / row, carried by projections onto the
new factors' spans); the full-rank claim (the sequence of ``W`` is AdamW's on ``W``, whatever ``s``); state that
resumes bitwise from a saved ``state_dict``; bad options."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from lowrank.optim import PreconditionedOptimizer, build_optimizer
from lowrank.optim.loft import LoftState
from tests.conftest import batches, tiny_bert


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def adapted(rank=2, alpha=3.0):
    model = mlp()
    lowrank.inject(model, lowrank.LoRAConfig(rank=rank, alpha=alpha, targets=["0", "2"], init="gaussian",
                                             init_options={"std": 0.4, "b_std": 0.4, "offset": False}, seed=1),
                   progress=False)
    return model


def data(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64))
            for _ in range(n)]


class Reference:
    """LoFT from the paper's equations, in full size and float64 numpy (no low-rank coordinates, no shared code)."""

    def __init__(self, model, lr, b1=0.9, b2=0.999, eps=1e-4, clip=0.0, alternate=True):
        self.lr, self.b1, self.b2, self.eps, self.clip, self.alternate = lr, b1, b2, eps, clip, alternate
        self.layers = []
        for _, layer in lowrank.adapted_layers(model):
            W0 = layer.base_weight().detach().numpy().copy()
            m, n = W0.shape
            self.layers.append({"W0": W0, "bias": layer.base_layer.bias.detach().numpy().copy(),
                                "A": layer.A.detach().numpy().copy(), "B": layer.B.detach().numpy().copy(),
                                "s": layer.scaling, "MA": np.zeros((m, n)), "CA": np.zeros((n, m, m)),
                                "MB": np.zeros((m, n)), "CB": np.zeros((m, n, n))})
        self.t = 0
        self.clipped = False

    def weights(self):
        return [L["W0"] + L["s"] * L["B"] @ L["A"] for L in self.layers]

    def grads(self, x, y):
        W = [torch.tensor(w, requires_grad=True) for w in self.weights()]
        b = [torch.tensor(L["bias"]) for L in self.layers]
        out = torch.tanh(x @ W[0].T + b[0]) @ W[1].T + b[1]
        return [g.numpy() for g in torch.autograd.grad((out - y).square().mean(), W)]

    def step(self, x, y):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        moves_A = not self.alternate or t % 2 == 0
        moves_B = not self.alternate or t % 2 == 1
        proj = []
        for L, G in zip(self.layers, self.grads(x, y)):
            PB, PA = L["B"] @ np.linalg.pinv(L["B"]), np.linalg.pinv(L["A"]) @ L["A"]
            L["MA"], L["MB"] = PB @ L["MA"], L["MB"] @ PA  # the moments, carried onto the new spans
            L["CA"], L["CB"] = PB @ L["CA"] @ PB, PA @ L["CB"] @ PA
            proj.append((PB @ G, G @ PA))
        norm = np.sqrt(sum(moves_A * (GA ** 2).sum() + moves_B * (GB ** 2).sum() for GA, GB in proj))
        coef = min(1.0, self.clip / (norm + 1e-6)) if self.clip else 1.0
        self.clipped |= coef < 1
        for L, (GA, GB) in zip(self.layers, proj):
            GA, GB = coef * GA, coef * GB
            L["MA"], L["MB"] = b1 * L["MA"] + (1 - b1) * GA, b1 * L["MB"] + (1 - b1) * GB
            L["CA"] = b2 * L["CA"] + (1 - b2) * np.einsum("ij,kj->jik", GA, GA)  # column j: GA[:, j] GA[:, j]^T
            L["CB"] = b2 * L["CB"] + (1 - b2) * np.einsum("ij,ik->ijk", GB, GB)  # row i: GB[i]^T GB[i]
            VA = np.einsum("jii->ij", L["CA"])
            VB = np.einsum("ijj->ij", L["CB"])
            DA = L["MA"] / (1 - b1 ** t) / (np.sqrt(VA) / np.sqrt(1 - b2 ** t) + self.eps)
            DB = L["MB"] / (1 - b1 ** t) / (np.sqrt(VB) / np.sqrt(1 - b2 ** t) + self.eps)
            A, B = L["A"].copy(), L["B"].copy()
            if moves_A:
                L["A"] = A - self.lr * np.linalg.pinv(B) @ DA / L["s"]
            if moves_B:
                L["B"] = B - self.lr * DB @ np.linalg.pinv(A) / L["s"]


def factors(model):
    return [(layer.A.detach().numpy().copy(), layer.B.detach().numpy().copy())
            for _, layer in lowrank.adapted_layers(model)]


@pytest.mark.parametrize("options", [{}, {"alternate": False, "clip": 0.05, "eps": 1e-3},
                                     {"b1": 0.0, "b2": 0.9, "eps": 1e-6, "clip": 0.05}])
def test_steps_match_a_full_size_float64_reference(options):
    model = adapted()
    ref = Reference(model, lr=0.03, **options)
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="loft", lr=0.03, **options)
    worst = 0.0
    for step, (x, y) in enumerate(data(8), 1):
        before = factors(model)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        ref.step(x, y)
        after = factors(model)
        for (A, B), L, (A0, B0) in zip(after, ref.layers, before):
            worst = max(worst, np.abs(A - L["A"]).max() / np.abs(L["A"]).max(),
                        np.abs(B - L["B"]).max() / np.abs(L["B"]).max())
            if options.get("alternate", True):  # one factor per step: B on odd steps, A on even ones
                assert np.array_equal(A, A0) == (step % 2 == 1) and np.array_equal(B, B0) == (step % 2 == 0)
        moved = max(np.abs(A - A0).max() for (A, _), (A0, _) in zip(after, before))
    assert moved > 1e-3  # it trains (the last step moved A)
    assert ref.clipped == bool(options.get("clip"))  # the clip is active where it is asked for
    assert worst < 1e-9, worst


def square(alpha, seed=0):
    """A 5 x 5 layer adapted at full rank (r = m = n)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 5, bias=False)).double()
    lowrank.inject(model, lowrank.LoRAConfig(rank=5, alpha=alpha, targets=["0"], init="gaussian",
                                             init_options={"std": 0.5, "b_std": 0.5, "offset": False}, seed=1),
                   progress=False)
    return model, dict(lowrank.adapted_layers(model))["0"]


def full_rank_gap(alpha=5.0, steps=20, **options):
    """Largest relative gap between LoFT's ``W = W0 + s B A`` and AdamW run on ``W`` itself, over ``steps``."""
    model, layer = square(alpha)
    W = (layer.base_weight() + layer.delta_weight()).detach().clone().requires_grad_(True)
    adamw = torch.optim.AdamW([W], lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="loft", lr=0.05, eps=1e-8, **options)
    g = torch.Generator().manual_seed(3)
    gap = 0.0
    for _ in range(steps):
        x, y = (torch.randn(32, 5, generator=g, dtype=torch.float64) for _ in range(2))
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        adamw.zero_grad()
        (x @ W.T - y).square().mean().backward()
        adamw.step()
        mine = (layer.base_weight() + layer.delta_weight()).detach()
        gap = max(gap, ((mine - W.detach()).abs().max() / W.detach().abs().max()).item())
    return gap


@pytest.mark.parametrize("alpha", [5.0, 10.0, 1.5])  # s = 1, 2, 0.3: the W sequence does not depend on s
def test_full_rank_recovers_adamw_on_the_full_weight(alpha):
    assert full_rank_gap(alpha) < 1e-9


def test_full_rank_equivalence_needs_the_right_transport_and_alternation():
    """The claim can fail: the reference code's transposed second-moment transport, or moving both factors in
    one step, leave AdamW's trajectory."""
    assert full_rank_gap(reference_transport=True) > 1e-2
    assert full_rank_gap(alternate=False) > 1e-2


def test_reference_transport_differs_only_through_the_carried_second_moment():
    runs = {}
    for b2, ref in [(0.0, False), (0.0, True), (0.99, False), (0.99, True)]:
        model = adapted()
        opt = PreconditionedOptimizer(model, base="sgd", preconditioner="loft", lr=0.03, b2=b2,
                                      reference_transport=ref)
        for x, y in data(5):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
        runs[b2, ref] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert torch.equal(runs[0.0, False], runs[0.0, True])
    assert (runs[0.99, False] - runs[0.99, True]).abs().max() > 1e-6


def bert():
    model = tiny_bert()
    lowrank.inject(model, lowrank.LoRAConfig(rank=3, alpha=6, targets=["query", "value"], trainable=["classifier"],
                                             init="gaussian", init_options={"b_std": 0.05}), progress=False)
    return model.train()


def train(model, opt, data):
    for b in data:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()


def test_state_resumes_bitwise_through_a_saved_state_dict():
    """Saved after an odd number of steps, so the resumed run must also pick up the alternation phase."""
    data = batches("bert", 6, seed=4)
    options = {"clip": 0.5, "weight_decay": 0.01}
    model = bert()
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="loft", lr=1e-2, **options)
    train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[3:])
    saved = opt.state_dict()["layers"]
    name = next(iter(saved))
    assert set(saved[name]) == set(LoftState._fields) and int(saved[name]["step"]) == 6
    assert saved[name]["v_A"].shape == (32, 3, 3) and saved[name]["m_B"].shape == (32, 3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = bert()
    resumed.load_state_dict(ckpt["model"])
    opt2 = PreconditionedOptimizer(resumed, base="sgd", preconditioner="loft", lr=1e-2, **options)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[3:])
    got, want = dict(resumed.named_parameters()), dict(model.named_parameters())
    assert all(torch.equal(got[n], p) for n, p in want.items())
    for layer, st in opt2.state_dict()["layers"].items():
        assert all(torch.equal(v, saved[layer][k]) for k, v in st.items()), layer

    fresh = bert()  # a fresh optimizer differs: the test can fail
    opt3 = PreconditionedOptimizer(fresh, base="sgd", preconditioner="loft", lr=1e-2, **options)
    fresh.load_state_dict(ckpt["model"])
    train(fresh, opt3, data[3:])
    assert not all(torch.equal(p, want[n]) for n, p in fresh.named_parameters())


def test_a_state_for_another_rank_is_refused():
    model = bert()
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="loft", lr=1e-2)
    train(model, opt, batches("bert", 1))
    other = tiny_bert()
    lowrank.inject(other, lowrank.LoRAConfig(rank=2, alpha=6, targets=["query", "value"], trainable=["classifier"],
                                             init="gaussian", init_options={"b_std": 0.05}), progress=False)
    opt2 = PreconditionedOptimizer(other, base="sgd", preconditioner="loft", lr=1e-2)
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match="nothing was loaded"):
        opt2.load_state_dict(opt.state_dict())
    assert all(torch.equal(v, before["layers"][n][k]) for n, st in opt2.state_dict()["layers"].items()
               for k, v in st.items())


@pytest.mark.parametrize("options,match", [
    ({"b1": 1.0}, r"b1=1.0: must be in \[0, 1\)"),
    ({"b2": -0.1}, r"b2=-0.1: must be in \[0, 1\)"),
    ({"eps": 0.0}, r"eps=0.0: must be > 0"),
    ({"clip": -1.0}, r"clip=-1.0: must be >= 0"),
    ({"delta": -1.0}, r"invalid delta=-1.0"),
    ({"alternate": "yes"}, r"option alternate='yes' of preconditioner 'loft' must be true or false"),
    ({"eps": float("nan")}, r"option eps=nan of preconditioner 'loft' must be a finite number"),
])
def test_bad_options_are_refused_with_the_fix(options, match):
    with pytest.raises(ValueError, match=match):
        lowrank.get_preconditioner("loft")(**options)


def test_misuse_is_told_plainly():
    with pytest.warns(UserWarning, match="normalizes them again.*base='sgd'"):
        PreconditionedOptimizer(bert(), base="adamw", preconditioner="loft")
    model = bert()
    opt = build_optimizer(model, "sgd+lora_fa+loft", lr=1e-2)
    with pytest.raises(ValueError, match="loft needs grad_A.*freezes A"):
        train(model, opt, batches("bert", 1))
