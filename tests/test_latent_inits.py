"""LoRA-XS and LoRA-SB initializations against float64 numpy references of their formulas
(arXiv 2405.17604, 2411.19557): LoRA-XS ``B = U_r``, ``A = S_r V_r^T`` of ``W0``, ``R = 0``; LoRA-SB the
rank-``r`` truncation of ``dW = -eta sign(G)`` as ``B = U_r``, ``A = V_r^T``, ``R = S_r / s``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank.theory import init_factors


def trunc(M: np.ndarray, r: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


@pytest.mark.parametrize("shape,r", [((12, 20), 3), ((20, 12), 4), ((16, 16), 2)])
def test_lora_xs_is_the_top_r_svd_of_w0_with_orthonormal_b_and_zero_core(shape, r):
    g = np.random.default_rng(0)
    W0, G = g.standard_normal(shape), g.standard_normal(shape)
    res, s = init_factors("lora_xs", torch.from_numpy(G), W0=torch.from_numpy(W0), rank=r, scaling="standard")
    A, B, R = (t.double().numpy() for t in (res.A, res.B, res.extras["R"]))
    np.testing.assert_allclose(B @ A, trunc(W0, r), atol=1e-10)  # the singular values sit in A
    np.testing.assert_allclose(B.T @ B, np.eye(r), atol=1e-12)
    assert not R.any() and not res.offset


@pytest.mark.parametrize("update", ["sign", "gradient"])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_lora_sb_is_the_rank_r_first_update(update, scaling):
    g = np.random.default_rng(1)
    W0, G = g.standard_normal((14, 18)), g.standard_normal((14, 18))
    r, eta = 3, 1e-3
    res, s = init_factors("lora_sb", torch.from_numpy(G), W0=torch.from_numpy(W0), rank=r, scaling=scaling,
                          init_options={"eta": eta, "update": update, "progress": False})
    A, B, R = (t.double().numpy() for t in (res.A, res.B, res.extras["R"]))
    dW = -eta * (np.sign(G) if update == "sign" else G)
    np.testing.assert_allclose(s * B @ R @ A, trunc(dW, r), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(B.T @ B, np.eye(r), atol=1e-12)
    np.testing.assert_allclose(A @ A.T, np.eye(r), atol=1e-12)
    assert np.allclose(R, np.diag(np.diag(R))) and not res.offset
