"""PiSSA, MiLoRA, OLoRA, LoRA-One and the Gaussian ablation arms against float64 references from the papers' formulas."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from lowrank import LoRAConfig

from .conftest import batches, tiny_gpt2
from .test_lora_ga import run_init, spectrum_matrix, truncation


def _single_layer(W0: np.ndarray, conv1d: bool = False) -> nn.Module:
    m, n = W0.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(m, n).double()
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(W0.T))
    else:
        layer = nn.Linear(n, m).double()
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(W0))
    return nn.Sequential(OrderedDict(fc=layer))


def _inject(W0, init, r, conv1d=False, scaling="standard", alpha=8.0, **options):
    model = _single_layer(W0, conv1d)
    lowrank.inject(model, LoRAConfig(targets=["fc"], rank=r, alpha=alpha, scaling=scaling, init=init,
                                     init_options=options), progress=False)
    layer = model.fc
    return (layer.base_weight().detach().numpy(), layer.A.detach().numpy(), layer.B.detach().numpy(), layer.scaling)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_pissa_residual_and_rank_r_truncation(conv1d, scaling):
    W0 = spectrum_matrix(20, 30, seed=1, decay=0.85) * 3
    W, A, B, s = _inject(W0, "pissa", 4, conv1d=conv1d, scaling=scaling)
    np.testing.assert_allclose(W + s * B @ A, W0, atol=1e-12)
    np.testing.assert_allclose(s * B @ A, truncation(W0, 4), atol=1e-12)
    np.testing.assert_allclose(A @ A.T, B.T @ B, atol=1e-12)  # balanced factors


def test_pissa_randomized_is_accurate_and_reproducible():
    W0 = spectrum_matrix(96, 128, seed=2, decay=0.9)
    r = 8
    _, A, B, s = _inject(W0, "pissa", r, svd="randomized")
    _, A2, B2, _ = _inject(W0, "pissa", r, svd="randomized")
    assert np.array_equal(A, A2) and np.array_equal(B, B2)  # same seed, same init (also on reload)
    ref = truncation(W0, r)
    err = np.linalg.norm(s * B @ A - ref) / np.linalg.norm(ref)
    assert err < 0.01, err
    # a single block (q = r, no iterations) is far worse: the Krylov depth is what buys accuracy
    _, A3, B3, _ = _inject(W0, "pissa", r, svd="randomized", niter=0)
    assert np.linalg.norm(s * B3 @ A3 - ref) / np.linalg.norm(ref) > 5 * err


def test_milora_keeps_the_principal_part():
    W0 = spectrum_matrix(24, 36, seed=3, decay=0.8) * 5
    W, A, B, s = _inject(W0, "milora", 3)
    sv0 = np.linalg.svd(W0, compute_uv=False)
    assert np.linalg.norm(W, 2) == pytest.approx(sv0[0], rel=1e-12)
    np.testing.assert_allclose(W + s * B @ A, W0, atol=1e-12)
    np.testing.assert_allclose(s * B @ A, W0 - truncation(W0, 24 - 3), atol=1e-12)  # the minor 3 components
    np.testing.assert_allclose(np.linalg.svd(s * B @ A, compute_uv=False)[:3], sv0[-3:], rtol=1e-10)


@pytest.mark.parametrize("conv1d", [False, True])
def test_olora_orthonormal_b_and_offset(conv1d):
    W0 = np.random.default_rng(4).standard_normal((20, 14))
    W, A, B, s = _inject(W0, "olora", 5, conv1d=conv1d)
    np.testing.assert_allclose(B.T @ B, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(W + s * B @ A, W0, atol=1e-12)
    Q, R = np.linalg.qr(W0)
    np.testing.assert_allclose(B @ A, Q[:, :5] @ R[:5], atol=1e-12)  # sign-free: the product of the factors


def test_olora_on_gpt2_conv1d_model():
    model = tiny_gpt2()
    lowrank.inject(model, LoRAConfig(targets=["c_attn", "c_fc"], rank=4, init="olora"), progress=False)
    for _, layer in lowrank.adapted_layers(model):
        B = layer.B.detach().double()
        torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)


def test_lora_one_is_a_truncated_gradient_step_with_base_unchanged():
    m, n, r, gamma = 20, 28, 3, 64.0
    G = spectrum_matrix(m, n, seed=5)
    W0 = spectrum_matrix(m, n, seed=6)
    A, B, s, offset = run_init("lora_one", G, W0, r, scaling="rslora", gamma=gamma)
    assert not offset and not lowrank.get_initializer("lora_one").preserves_output
    sigma1 = np.linalg.svd(G, compute_uv=False)[0]
    np.testing.assert_allclose(s * B @ A, -(s / (gamma * sigma1)) * truncation(G, r), atol=1e-12)


def test_lora_one_leaves_base_weights_bitwise():
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lowrank.inject(model, LoRAConfig(targets=["c_attn"], rank=2, init="lora_one", scaling="rslora"),
                   data=batches("gpt2", 2), progress=False)
    for n, layer in lowrank.adapted_layers(model):
        assert torch.equal(layer.base_layer.weight, before[n + ".weight"])
        assert not layer.offset


def test_gaussian_arms():
    W0 = np.random.default_rng(7).standard_normal((30, 40))
    # default: A ~ N(0, 1/r^2), B = 0, no offset
    W, A, B, _ = _inject(W0, "gaussian", 4)
    assert np.array_equal(W, W0) and not B.any() and A.std() == pytest.approx(1 / 4, rel=0.15)
    # "Gaussian" arm: non-zero A and B, offset
    W, A, B, s = _inject(W0, "gaussian", 4, std=0.1, b_std=0.2)
    assert B.std() == pytest.approx(0.2, rel=0.15)
    np.testing.assert_allclose(W + s * B @ A, W0, atol=1e-12)
    # "+SO" arm: random orthonormal frames times the stable factor, offset
    W, A, B, s = _inject(W0, "gaussian", 4, scaling="rslora", scale="stable", stable_gamma=16)
    c = 30 ** 0.25 / math.sqrt(16)
    np.testing.assert_allclose(A @ A.T, c ** 2 * np.eye(4), atol=1e-6)  # frames drawn in float32
    np.testing.assert_allclose(B.T @ B, c ** 2 * np.eye(4), atol=1e-6)
    np.testing.assert_allclose(W + s * B @ A, W0, atol=1e-12)
    # offset=False with non-zero B declares that the output changes
    assert not lowrank.get_initializer("gaussian")(b_std=0.1, offset=False).preserves_output


def test_ga_without_stable_scale_is_expressible():
    """The "+GA" arm: gradient directions with unit scale; A, B are then pure singular vectors."""
    G = spectrum_matrix(16, 24, seed=8)
    A, B, s, _ = run_init("lora_ga", G, spectrum_matrix(16, 24, seed=9), 2, scale="unit")
    np.testing.assert_allclose(A @ A.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(s ** 2 * (B @ B.T @ G + G @ A.T @ A), s ** 2 * truncation(G, 4), atol=1e-10)
