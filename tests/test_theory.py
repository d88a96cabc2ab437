"""lowrank.theory: the one-step identity, LoRA-GA's alignment theorem and scale stability, as
property tests against float64 numpy references written from the papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lowrank.theory import (alignment, first_step_update, init_factors, loglog_slope, moments, scale_stability)


@st.composite
def layer(draw, max_dim=96, dtypes=(torch.float64, torch.float32)):
    r = draw(st.integers(1, 8))
    m = draw(st.integers(2 * r, max_dim))
    n = draw(st.integers(2 * r, max_dim))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31))
    return m, n, r, dtype, np.random.default_rng(seed)


def svd_np(G):
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    return U, S, Vt


@given(layer(), st.sampled_from([1e-3, 0.1, 1.0]), st.sampled_from([0.5, 2.0]))
def test_exact_one_step_identity(p, lr, s):
    m, n, r, dtype, rng = p
    A, B, G = rng.standard_normal((r, n)), rng.standard_normal((m, r)), rng.standard_normal((m, n))
    want = -lr * s ** 2 * (B @ B.T @ G + G @ A.T @ A) + lr ** 2 * s ** 3 * G @ A.T @ B.T @ G
    t = lambda x: torch.from_numpy(x).to(dtype)  # noqa: E731
    got = first_step_update(t(A), t(B), s, t(G), lr, exact=True).double().numpy()
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    first = first_step_update(t(A), t(B), s, t(G), lr, exact=False).double().numpy()
    np.testing.assert_allclose(first, -lr * s ** 2 * (B @ B.T @ G + G @ A.T @ A), rtol=tol,
                               atol=tol * np.abs(want).max())


@given(layer(dtypes=(torch.float64,)), st.sampled_from(["ArB2r", "A2rBr", "ArBr", "random"]),
       st.sampled_from(["stable", "gd", "unit"]))
def test_lora_ga_first_step_is_zeta_G2r(p, direction, scale):
    m, n, r, dtype, rng = p
    G = rng.standard_normal((m, n))
    U, S, Vt = svd_np(G)
    assume(S[2 * r - 1] - S[2 * r] > 1e-6 * S[0] if 2 * r < len(S) else True)  # G_2r unique
    res, s = init_factors("lora_ga", torch.from_numpy(G), rank=r, alpha=8.0,
                          init_options={"direction": direction, "scale": scale, "progress": False})
    c = {"stable": m ** 0.25 / math.sqrt(16.0), "gd": 1 / s, "unit": 1.0}[scale]
    zeta = s ** 2 * c ** 2
    G2r = (U[:, :2 * r] * S[:2 * r]) @ Vt[:2 * r]
    first = first_step_update(res.A, res.B, s, torch.from_numpy(G), lr=1.0, exact=False).numpy()
    np.testing.assert_allclose(-first, zeta * G2r, rtol=1e-8, atol=1e-9 * zeta * S[0])
    al = alignment(res.A, res.B, s, torch.from_numpy(G))
    floor = math.sqrt((S[2 * r:] ** 2).sum() / (S ** 2).sum())
    assert al.floor == pytest.approx(floor, abs=1e-12)
    assert abs(al.excess) < 1e-9 and al.rel_error_2r < 1e-7
    assert al.zeta == pytest.approx(zeta, rel=1e-9)


@given(layer(dtypes=(torch.float64,)))
def test_competitors_never_beat_the_floor(p):
    """Random orthonormal factors of the same norm, and the same-triplet split, are never better."""
    m, n, r, dtype, rng = p
    G = rng.standard_normal((m, n))
    U, S, Vt = svd_np(G)
    assume(2 * r < len(S) and S[r] > 1e-6 * S[0])
    res, s = init_factors("lora_ga", torch.from_numpy(G), rank=r, alpha=8.0, init_options={"progress": False})
    ga = alignment(res.A, res.B, s, torch.from_numpy(G))
    c = res.A.norm().item() / math.sqrt(r)
    Qa, _ = np.linalg.qr(rng.standard_normal((n, r)))
    Qb, _ = np.linalg.qr(rng.standard_normal((m, r)))
    rand = alignment(torch.from_numpy(c * Qa.T), torch.from_numpy(c * Qb), s, torch.from_numpy(G))
    same = alignment(torch.from_numpy(c * Vt[:r]), torch.from_numpy(c * U[:, :r]), s, torch.from_numpy(G))
    assert rand.rel_error >= ga.rel_error - 1e-12
    assert same.rel_error >= ga.rel_error - 1e-12
    # The same-triplet split only spans rank r: its error is at least the rank-r floor, which is
    # strictly above the rank-2r floor whenever sigma_{r+1} > 0.
    floor_r = math.sqrt((S[r:] ** 2).sum() / (S ** 2).sum())
    assert same.rel_error >= floor_r - 1e-9 > ga.rel_error


def test_alignment_of_zero_adapter_is_total_error():
    G = torch.randn(6, 5, dtype=torch.float64)
    al = alignment(torch.zeros(2, 5), torch.zeros(6, 2), 1.0, G)
    assert al.rel_error == 1.0 and al.cosine == 0.0


@given(st.integers(8, 96), st.integers(8, 96), st.integers(1, 4))
def test_stable_scale_rslora_forward_and_backward_moments(m, n, r):
    rows = scale_stability("lora_ga", scaling="rslora", alpha=16.0, widths=[m], aspect=n / m, ranks=[r],
                           batch_size=16, num_batches=1, progress=False)
    row = rows[0]
    assume(row["n"] >= 2 * r)
    # Exact for orthonormal factors: ||s B A||_F^2 = s^2 c^4 r with c^4 = m / gamma^2.
    assert row["forward"] == pytest.approx(16.0 ** 2 / 16.0 ** 2, rel=1e-4)
    assert row["backward"] == pytest.approx(16.0 ** 2 * m / (16.0 ** 2 * row["n"]), rel=1e-4)


def test_standard_scaling_forward_moment_decays_like_one_over_r():
    with pytest.warns(UserWarning, match="rsLoRA"):  # lora_ga says it is defined with rsLoRA
        rows = scale_stability("lora_ga", scaling="standard", widths=[64], ranks=[1, 2, 4, 8, 16], batch_size=16,
                               num_batches=1, progress=False)
    slope = loglog_slope([r["r"] for r in rows], [r["forward"] for r in rows])
    assert slope == pytest.approx(-1.0, abs=0.02)
    rs = scale_stability("lora_ga", scaling="rslora", widths=[64], ranks=[1, 2, 4, 8, 16], batch_size=16,
                         num_batches=1, progress=False)
    assert abs(loglog_slope([r["r"] for r in rs], [r["forward"] for r in rs])) < 0.02


def test_scale_stability_after_steps_and_moments():
    rows = scale_stability("lora_ga", widths=[32, 64], ranks=[2], steps=[0, 3], lr=0.05, progress=False)
    assert [(r["m"], r["step"]) for r in rows] == [(32, 0), (32, 3), (64, 0), (64, 3)]
    first, last = [r for r in rows if r["step"] == 0], [r for r in rows if r["step"] == 3]
    assert first and last
    assert all(r["update"] == 0 for r in first)
    assert all(r["update"] > 0 and math.isfinite(r["update"]) for r in last)
    d = torch.arange(6.0).reshape(2, 3)
    assert moments(d) == (55 / 2, 55 / 3)


def test_vanilla_kaiming_moment_is_zero_at_init():
    rows = scale_stability("kaiming", widths=[32], ranks=[4], progress=False)
    assert rows[0]["forward"] == 0.0


def test_compare_on_tiny_model_ranks_lora_ga_at_the_floor():
    import lowrank
    from tests.conftest import batches, tiny_bert

    data = batches("bert", 3)
    cfgs = {name: lowrank.LoRAConfig(rank=2, alpha=4, scaling="rslora", targets=["query", "value"], init=name,
                                     init_options={"progress": False} if name == "lora_ga" else {})
            for name in ("lora_ga", "pissa", "kaiming")}
    results, G = lowrank.theory.compare(tiny_bert, cfgs, data, progress=False)
    assert set(G) == set(results["lora_ga"])
    for name, a in results["lora_ga"].items():
        assert a.excess < 1e-5, name
        assert results["pissa"][name].rel_error >= a.rel_error - 1e-9
        assert results["kaiming"][name].rel_error >= a.rel_error - 1e-9


def test_adapted_alignment_matches_compare_and_needs_adapters():
    import lowrank
    from tests.conftest import batches, tiny_bert

    data = batches("bert", 3)
    cfg = lowrank.LoRAConfig(rank=2, alpha=4, scaling="rslora", targets=["query", "value"], init="lora_ga",
                             init_options={"progress": False})
    model = lowrank.inject(tiny_bert(), cfg, data=data, progress=False)
    here = lowrank.theory.adapted_alignment(model, data, progress=False)
    there, _ = lowrank.theory.compare(tiny_bert, {"ga": cfg}, data, progress=False)
    assert set(here) == set(there["ga"])
    for name, a in here.items():  # G at W_eff = (W0 - s B A) + s B A: W0 up to one rounding
        assert a.excess < 1e-4 and abs(a.rel_error - there["ga"][name].rel_error) < 1e-4, name
    with pytest.raises(ValueError, match="no lowrank adapters"):
        lowrank.theory.adapted_alignment(tiny_bert(), data)


def test_report_tables_show_allocated_ranks_and_the_floor():
    import lowrank
    from lowrank.theory.alignment import compare
    from lowrank.theory.tables import per_layer, summarize

    from .conftest import batches as make_batches
    from .conftest import tiny_bert

    data = make_batches("bert", 2)
    configs = {name: lowrank.LoRAConfig(rank=2, alpha=4, scaling="rslora", targets=["query", "value"], init=name,
                                        init_options={"progress": False, **opts})
               for name, opts in (("lora_ga", {}), ("eva", {"rho": 2.0}))}
    results, G = compare(lambda: tiny_bert(), configs, data, progress=False)
    table = per_layer(results, G, 2)
    rows = table.splitlines()[2:]
    assert len(rows) == len(G) == 4
    for row in rows:  # lora_ga sits at the rank-4 floor: its error equals the floor column
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == cells[2].split()[0], row
    ranks = [a.rank for a in results["eva"].values()]
    assert sum(ranks) == 8 and (len(set(ranks)) == 1 or "(r=" in table)
    assert "| lora_ga |" in summarize(results) and "| eva |" in summarize(results)
