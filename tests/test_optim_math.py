"""Preconditioner formulas against independent float64 numpy references written from the papers' formulas.

Notation: A (r, n), B (m, r), G (m, n), s the adapter scale, grad_A = s B^T G, grad_B = s G A^T.
A first-order SGD step with directions (g_A, g_B) changes s B A by -lr s (B g_A + g_B A).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank import get_preconditioner
from lowrank.optim import lora_pro_directions


def proj_cols(B: np.ndarray) -> np.ndarray:
    return B @ np.linalg.inv(B.T @ B) @ B.T


def proj_rows(A: np.ndarray) -> np.ndarray:
    return A.T @ np.linalg.inv(A @ A.T) @ A


def well_conditioned(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A full-rank matrix with singular values in [0.5, 2]."""
    U, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    V, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    return U @ np.diag(rng.uniform(0.5, 2.0, cols)) @ V.T


@st.composite
def problems(draw):
    r = draw(st.integers(1, 4))
    m = draw(st.integers(r, 20))
    n = draw(st.integers(r, 20))
    s = draw(st.sampled_from([0.5, 2.0, 16 / np.sqrt(r)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    A = well_conditioned(rng, n, r).T          # (r, n)
    B = well_conditioned(rng, m, r)            # (m, r)
    G = rng.standard_normal((m, n))
    return A, B, G, s, rng


def grads(A, B, G, s):
    return s * B.T @ G, s * G @ A.T


def first_order(name: str, A, B, G, s, **options) -> np.ndarray:
    """``s (B g_A + g_B A)`` (the step direction of ``s B A``; times ``-lr`` for the update)."""
    gA, gB = grads(A, B, G, s)
    t = lambda x: torch.from_numpy(x)  # noqa: E731
    pre = get_preconditioner(name)(**options)
    nA, nB = pre.update(None if not pre.trains_A else t(gA), t(gB), t(A), t(B), s, {})
    nA = np.zeros_like(gA) if nA is None else nA.numpy()
    return s * (B @ nA + nB.numpy() @ A)


@given(problems())
def test_riemannian_first_order_step_is_projection(p):
    A, B, G, s, _ = p
    want = s ** 2 * (proj_cols(B) @ G + G @ proj_rows(A))
    np.testing.assert_allclose(first_order("riemannian", A, B, G, s, delta=0.0), want, rtol=1e-9, atol=1e-9)


@given(problems())
def test_riemannian_invariant_under_reparametrization(p):
    A, B, G, s, rng = p
    r = A.shape[0]
    R = well_conditioned(rng, r, r)
    before = first_order("riemannian", A, B, G, s, delta=0.0)
    after = first_order("riemannian", np.linalg.inv(R) @ A, B @ R, G, s, delta=0.0)
    np.testing.assert_allclose(after, before, rtol=1e-8, atol=1e-8)


def test_plain_gd_is_not_invariant():
    rng = np.random.default_rng(0)
    A, B, G = well_conditioned(rng, 12, 3).T, well_conditioned(rng, 10, 3), rng.standard_normal((10, 12))
    R = np.diag([3.0, 1.0, 1 / 3])
    before = first_order("identity", A, B, G, 2.0)
    after = first_order("identity", np.linalg.inv(R) @ A, B @ R, G, 2.0)
    assert np.linalg.norm(after - before) > 0.1 * np.linalg.norm(before)
    # The reference formula itself: -lr s^2 (B B^T G + G A^T A).
    np.testing.assert_allclose(before, 4.0 * (B @ B.T @ G + G @ A.T @ A), rtol=1e-12)


@given(problems())
def test_lora_pro_equivalent_gradient_is_tangent_projection(p):
    A, B, G, s, _ = p
    PB, PA = proj_cols(B), proj_rows(A)
    want = PB @ G + G @ PA - PB @ G @ PA
    got = first_order("lora_pro", A, B, G, s)  # the equivalent gradient s (B g_A + g_B A)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


@given(problems())
def test_lora_pro_sylvester_residual(p):
    A, B, G, s, _ = p
    gA, gB = grads(A, B, G, s)
    t = torch.from_numpy
    _, _, X = lora_pro_directions(t(gA), t(gB), t(A), t(B), s)
    X = X.numpy()
    BtB, AAt = B.T @ B, A @ A.T
    rhs = -(1 / s ** 2) * np.linalg.inv(BtB) @ gA @ A.T
    residual = BtB @ X + X @ AAt - rhs
    assert np.linalg.norm(residual) <= 1e-9 * max(1.0, np.linalg.norm(rhs))


@given(problems())
def test_lora_fa_equivalent_gradient_is_row_projection(p):
    A, B, G, s, _ = p
    got = first_order("lora_fa", A, B, G, s)
    np.testing.assert_allclose(got, G @ proj_rows(A), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", ["riemannian", "lora_pro", "lora_fa"])
def test_vanilla_init_b_zero_is_defined(name):
    """B = 0 makes B^T B singular: pseudo-inverse, so the A direction is 0 and the step is G P_A."""
    rng = np.random.default_rng(1)
    A, B, G, s = well_conditioned(rng, 12, 3).T, np.zeros((10, 3)), rng.standard_normal((10, 12)), 2.0
    got = first_order(name, A, B, G, s, **({"delta": 0.0} if name == "riemannian" else {}))
    assert np.isfinite(got).all()
    scale = s ** 2 if name == "riemannian" else 1.0  # riemannian's direction carries s^2, the others are s-free
    np.testing.assert_allclose(got, scale * G @ proj_rows(A), rtol=1e-9, atol=1e-9)


def test_riemannian_delta_damps():
    rng = np.random.default_rng(2)
    A, B, G = well_conditioned(rng, 8, 2).T, well_conditioned(rng, 6, 2), rng.standard_normal((6, 8))
    gA, gB = grads(A, B, G, 1.0)
    t = torch.from_numpy
    nA, nB = get_preconditioner("riemannian")(delta=0.5).update(t(gA), t(gB), t(A), t(B), 1.0, {})
    np.testing.assert_allclose(nA.numpy(), np.linalg.inv(B.T @ B + 0.5 * np.eye(2)) @ gA, rtol=1e-10)
    np.testing.assert_allclose(nB.numpy(), gB @ np.linalg.inv(A @ A.T + 0.5 * np.eye(2)), rtol=1e-10)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "x", True])
def test_bad_delta(bad):
    with pytest.raises(ValueError, match="delta"):
        get_preconditioner("riemannian")(delta=bad)


@pytest.mark.parametrize("name", ["riemannian", "lora_pro", "lora_fa", "identity", "lora_plus"])
def test_update_many_equals_per_layer_update(name):
    """The batched path (one eigh per group of equal shapes) gives each layer's own answer."""
    from lowrank.optim.base import LayerGrads

    rng = np.random.default_rng(3)
    shapes = [(10, 12, 3), (10, 12, 3), (7, 9, 2), (10, 12, 3), (5, 5, 1)]
    layers = []
    for i, (m, n, r) in enumerate(shapes):
        A, B = well_conditioned(rng, n, r).T, well_conditioned(rng, m, r)
        if i == 1:
            B = np.zeros_like(B)  # a vanilla-init layer in the same group as full-rank ones
        gA, gB = grads(A, B, rng.standard_normal((m, n)), 1.5)
        t = torch.from_numpy
        layers.append(LayerGrads(t(gA), t(gB), t(A), t(B), 1.5, {}))
    pre = get_preconditioner(name)()
    many = pre.update_many([l if pre.trains_A else l._replace(grad_A=None) for l in layers])
    for layer, (nA, nB) in zip(layers, many):
        one = pre.update(layer.grad_A if pre.trains_A else None, layer.grad_B, layer.A, layer.B, 1.5, {})
        for got, want in zip((nA, nB), one):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
