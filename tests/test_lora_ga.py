"""LoRA-GA against an independent float64 reference written from the paper's formulas (numpy/scipy, not the code under test)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from lowrank import LoRAConfig
from lowrank.init.base import LayerContext

from .conftest import batches, tiny_bert

DIRECTIONS = ["ArB2r", "A2rBr", "ArBr", "random"]
SCALES = ["stable", "gd", "unit", "weight"]


def spectrum_matrix(m, n, seed, decay=0.8):
    """float64 ``(m, n)`` with singular values ``decay^i`` (well separated) and random frames."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (U * decay ** np.arange(k)) @ V.T


def truncation(M, k):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k]


def c_reference(scale, m, s, gamma, W0, r):
    """The paper's factor c, computed independently."""
    return {"stable": m ** 0.25 / math.sqrt(gamma), "gd": 1.0 / s, "unit": 1.0,
            "weight": float(np.mean(np.sqrt(np.linalg.svd(W0, compute_uv=False)[:r] / s)))}[scale]


def run_init(name, G, W0, r, alpha=16.0, scaling="rslora", **options):
    """Run an initializer's ``init_layer`` on one layer with the given gradient (float64 in, numpy out)."""
    m, n = G.shape
    lin = nn.Linear(n, m, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W0))
    cfg = LoRAConfig(targets=["x"], rank=r, alpha=alpha, scaling=scaling, init=name, init_options=options)
    ctx = LayerContext("x", lin, rank=r, alpha=alpha, scaling=cfg.scaling_for("x"), seed=cfg.seed,
                       stats={"gradient": torch.from_numpy(G)})
    init = cfg.make_initializer()
    init.check_layer(ctx)
    res = init.init_layer(ctx)
    return res.A.double().numpy(), res.B.double().numpy(), ctx.scaling, res.offset


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("scale", SCALES)
def test_first_step_is_zeta_times_best_rank_2r(shape, direction, scale):
    m, n = shape
    r, gamma = 4, 16.0
    G = spectrum_matrix(m, n, seed=1)
    W0 = spectrum_matrix(m, n, seed=2, decay=0.95)
    A, B, s, offset = run_init("lora_ga", G, W0, r, direction=direction, scale=scale, stable_gamma=gamma)
    assert offset and A.shape == (r, n) and B.shape == (m, r)
    c = c_reference(scale, m, s, gamma, W0.astype(np.float32).astype(np.float64), r)
    zeta = s ** 2 * c ** 2
    first_order = s ** 2 * (B @ B.T @ G + G @ A.T @ A)
    want = zeta * truncation(G, 2 * r)
    rel = np.linalg.norm(first_order - want) / np.linalg.norm(want)
    assert rel < 1e-6 if scale == "weight" else rel < 1e-10, rel
    # pure singular vectors times c: A A^T = c^2 I, B^T B = c^2 I
    np.testing.assert_allclose(A @ A.T, c ** 2 * np.eye(r), atol=1e-6 * c ** 2)
    np.testing.assert_allclose(B.T @ B, c ** 2 * np.eye(r), atol=1e-6 * c ** 2)


def test_residual_is_the_eckart_young_floor_and_same_triplets_are_worse():
    m, n, r = 32, 48, 4
    G = spectrum_matrix(m, n, seed=3)
    A, B, s, _ = run_init("lora_ga", G, spectrum_matrix(m, n, 4), r, scale="gd")  # zeta = 1
    S = np.linalg.svd(G, compute_uv=False)
    floor = math.sqrt(float(np.sum(S[2 * r:] ** 2)))
    residual = np.linalg.norm(s ** 2 * (B @ B.T @ G + G @ A.T @ A) - G)
    assert residual == pytest.approx(floor, rel=1e-8)
    # Same r triplets for A and B (PEFT's "random" pitfall): first step 2 G_r, measurably worse.
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    A_same, B_same = Vt[:r] / s, U[:, :r] / s
    same = np.linalg.norm(s ** 2 * (B_same @ B_same.T @ G + G @ A_same.T @ A_same) - G)
    assert same > 1.5 * residual, (same, residual)


def test_random_direction_is_seeded_and_disjoint():
    from lowrank.init.lora_ga import split_indices

    for seed in range(20):
        ia, ib = split_indices("random", 5, torch.Generator().manual_seed(seed))
        assert sorted(ia + ib) == list(range(10))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert split_indices("random", 5, g()) == split_indices("random", 5, g())


def test_exact_one_step_sgd_identity():
    """One SGD step on a LoRA-GA layer: Delta(sBA) = -lr s^2 (BB^TG + GA^TA) + lr^2 s^3 G A^T B^T G."""
    m, n, r, lr = 12, 20, 3, 0.3
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((7, n)), rng.standard_normal((7, m))
    G = Y.T @ X  # gradient of L(W) = sum(Y * (X W^T)) w.r.t. W
    model = nn.Sequential(OrderedDict(fc=nn.Linear(n, m, bias=False))).double()
    cfg = LoRAConfig(targets=["fc"], rank=r, alpha=4.0, scaling="rslora", init="lora_ga", init_options={"scale": "unit"})
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    lowrank.inject(model, cfg, data=[(Xt, Yt)], loss_fn=lambda mdl, b: (b[1] * mdl(b[0])).sum(), progress=False)
    layer = model.fc
    A0, B0, s = layer.A.detach().numpy().copy(), layer.B.detach().numpy().copy(), layer.scaling
    loss = (Yt * model(Xt)).sum()
    loss.backward()
    np.testing.assert_allclose(layer.A.grad.numpy(), s * B0.T @ G, rtol=1e-10)
    np.testing.assert_allclose(layer.B.grad.numpy(), s * G @ A0.T, rtol=1e-10)
    torch.optim.SGD([layer.A, layer.B], lr=lr).step()
    delta = s * layer.B.detach().numpy() @ layer.A.detach().numpy() - s * B0 @ A0
    want = -lr * s ** 2 * (B0 @ B0.T @ G + G @ A0.T @ A0) + lr ** 2 * s ** 3 * G @ A0.T @ B0.T @ G
    np.testing.assert_allclose(delta, want, rtol=1e-9, atol=1e-12)


def test_inject_offsets_base_and_uses_the_estimated_gradient():
    """End to end on a tiny BERT: W + sBA = W0 and the first-order step matches zeta G_2r of the true G."""
    data = batches("bert", 3)
    model = tiny_bert()
    w0 = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if n.endswith("query")}
    ref = tiny_bert()
    for p in ref.parameters():
        p.requires_grad_(False)
    grads = {}
    for n in w0:
        ref.get_submodule(n).weight.requires_grad_(True)
    for b in data:
        ref(**b).loss.backward()
    for n in w0:
        grads[n] = ref.get_submodule(n).weight.grad.double().numpy() / len(data)
    r = 2
    lowrank.inject(model, LoRAConfig(targets=["query"], rank=r, alpha=8, scaling="rslora", init="lora_ga"), data=data,
                   progress=False)
    for n, layer in lowrank.adapted_layers(model):
        A, B = layer.A.detach().double().numpy(), layer.B.detach().double().numpy()
        s = layer.scaling
        np.testing.assert_allclose((layer.base_weight().double() + layer.delta_weight().double()).detach().numpy(),
                                   w0[n].numpy(), atol=1e-6)
        zeta = s ** 2 * math.sqrt(layer.d_out) / 16
        G = grads[n]
        want = zeta * truncation(G, 2 * r)
        rel = np.linalg.norm(s ** 2 * (B @ B.T @ G + G @ A.T @ A) - want) / np.linalg.norm(want)
        assert rel < 1e-3, (n, rel)


def test_randomized_svd_matches_full_and_is_reproducible():
    m, n, r = 64, 96, 4
    G = spectrum_matrix(m, n, seed=6, decay=0.9)
    W0 = spectrum_matrix(m, n, seed=7)
    A, B, s, _ = run_init("lora_ga", G, W0, r, svd="randomized")
    A2, B2, _, _ = run_init("lora_ga", G, W0, r, svd="randomized")
    assert np.array_equal(A, A2) and np.array_equal(B, B2)
    c2 = s ** 2 * math.sqrt(m) / 16
    want = c2 * truncation(G, 2 * r)
    rel = np.linalg.norm(s ** 2 * (B @ B.T @ G + G @ A.T @ A) - want) / np.linalg.norm(want)
    assert rel < 1e-3, rel


@pytest.mark.parametrize("options,match", [
    ({"direction": "ArB"}, "invalid direction='ArB'"),
    ({"scale": "weight_svd"}, "invalid scale='weight_svd'"),
    ({"stable_gamma": 0}, "invalid stable_gamma=0"),
    ({"svd": "lowrank"}, "invalid svd='lowrank'"),
    ({"num_batches": 0}, "invalid num_batches=0"),
    ({"directions": "ArB2r"}, r"unknown option\(s\) \['directions'\] for initializer 'lora_ga'; valid options: "),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(targets=["q"], init="lora_ga", init_options=options)


def test_auto_svd_is_exact_on_small_layers_and_randomized_on_wide_ones():
    from lowrank.init.svd import AUTO_FULL_MAX, top_svd

    g = torch.Generator().manual_seed(0)
    small = torch.randn(100, 80, generator=g)
    for a, b in zip(top_svd(small, 6, method="auto"), top_svd(small, 6, method="full")):
        assert torch.equal(a, b)
    wide = torch.randn(AUTO_FULL_MAX + 40, AUTO_FULL_MAX + 8, generator=g)
    auto = top_svd(wide, 6, method="auto", niter=4, generator=torch.Generator().manual_seed(1))
    rand = top_svd(wide, 6, method="randomized", niter=4, generator=torch.Generator().manual_seed(1))
    for a, b in zip(auto, rand):
        assert torch.equal(a, b)
    exact = top_svd(wide, 6, method="full")
    torch.testing.assert_close(auto[1], exact[1], rtol=1e-2, atol=0)  # a flat random spectrum: close, not exact
