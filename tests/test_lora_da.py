"""LoRA-DA (arXiv 2510.24561) against an independent float64 reference written from the paper's equations (numpy, not
the code under test), the optimality of its subspace for the objective it minimizes, its degenerate case (LoRA-One),
the ``"output_gradient_moment"`` statistic against hooks, and an end-to-end inject. PEFT has no LoRA-DA (0.21.2), so
there is no parity test."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from lowrank import LoRAConfig
from lowrank.init.base import LayerContext
from lowrank.init.collect import collect_statistics

from .conftest import MODELS, batches, tiny_bert

LAM = 1e-6


# ---------------------------------------------------------------- the reference (numpy float64, the paper's equations)

def reference(G, C, q, r, *, lam=LAM, beta=1.0, N=None, ratio=None):
    """``D = -diag(y) G Z^-1``, ``Omega = beta tr(Y^-1)/N Z^-1 - D^T D`` and its r smallest eigenvectors ``(n, r)``."""
    n = C.shape[0]
    Z = (C + C.T) / 2 + lam * np.eye(n)
    Z_inv = np.linalg.inv(Z)
    lam_y = lam if ratio is None else ratio * np.sort(q)[(len(q) - 1) // 2]  # torch's median: the lower middle
    y = 1.0 / (q + lam_y)
    D = -(y[:, None] * G) @ Z_inv
    omega = -D.T @ D
    if N is not None:
        omega = omega + beta * y.sum() / N * Z_inv
    evals, evecs = np.linalg.eigh((omega + omega.T) / 2)
    return D, omega, evals, evecs[:, :r]


def reference_factors(D, A0, *, scale, s, gamma=1024.0):
    """``(A (r, n), B (m, r))`` of the two scales (module docstring of ``lowrank.init.lora_da``)."""
    if scale == "stable":
        c = 1.0 / math.sqrt(gamma)
        return c * A0.T, c * D @ A0 / np.linalg.norm(D, 2)
    return A0.T, D @ A0 / s


def objective(D, Z_inv, y, A, *, beta, N):
    """The modeled ``E ||W^ - W_tgt||^2`` for ``A`` with orthonormal rows: ``||D (I - P)||^2 + beta tr(y)/N tr(A Z^-1 A^T)``."""
    P = A.T @ A
    bias = np.linalg.norm(D - D @ P) ** 2
    return bias + beta * y.sum() / N * np.trace(A @ Z_inv @ A.T)


def statistics(m, n, seed, *, cond=1e3):
    """Synthetic ``G`` (decaying spectrum), ``C`` (SPD, condition ``cond``, random frame) and ``q > 0``."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    G = (U[:, :k] * 0.8 ** np.arange(k)) @ V[:, :k].T
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    C = (Q * np.logspace(0, -math.log10(cond), n)) @ Q.T
    q = rng.uniform(0.5, 2.0, m) * 1e3
    return G, C, q


def balanced_N(G, C, q, beta=1.0):
    """An ``N`` at which the variance term is as large as the bias term (both matter)."""
    D, _, _, _ = reference(G, C, q, 1)
    Z_inv = np.linalg.inv(C + LAM * np.eye(C.shape[0]))
    y = 1.0 / (q + LAM)
    return max(1, int(beta * y.sum() * np.linalg.norm(Z_inv, 2) / np.linalg.norm(D, 2) ** 2))


def run_init(G, C, q, r, *, W0=None, alpha=16.0, scaling="rslora", name="x", **options):
    """``init_layer`` of ``lora_da`` on one layer with the given statistics (float64 in, numpy out)."""
    m, n = G.shape
    lin = nn.Linear(n, m, bias=False).double()
    if W0 is not None:
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W0))
    cfg = LoRAConfig(targets=[name], rank=r, alpha=alpha, scaling=scaling, init="lora_da",
                     init_options={"progress": False, **options})
    stats = {"gradient": torch.from_numpy(G), "covariance": torch.from_numpy(C),
             "output_gradient_moment": torch.from_numpy(q)}
    ctx = LayerContext(name, lin, rank=r, alpha=alpha, scaling=cfg.scaling_for(name), seed=cfg.seed, stats=stats)
    init = cfg.make_initializer()
    init.check_layer(ctx)
    res = init.init_layer(ctx)
    return res.A.double().numpy(), res.B.double().numpy(), ctx.scaling, res.offset


def align_signs(A, A_ref):
    """Flip the rows of ``A`` to the signs of ``A_ref`` (eigenvectors are defined up to sign)."""
    signs = np.sign(np.sum(A * A_ref, axis=1))
    return A * signs[:, None], signs


# ------------------------------------------------------------------------------------------- factors vs reference

@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("scale", ["stable", "paper"])
@pytest.mark.parametrize("with_variance", [False, True])
def test_factors_match_the_float64_reference(shape, scale, with_variance):
    m, n = shape
    r = 4
    G, C, q = statistics(m, n, seed=1)
    N = balanced_N(G, C, q) if with_variance else None
    D, omega, evals, A0 = reference(G, C, q, r, N=N)
    assert evals[r] - evals[r - 1] > 1e-6 * abs(evals).max()  # the subspace is well defined
    options = {"scale": scale} | ({"num_samples": N} if N else {"variance_weight": 0.0})
    A, B, s, offset = run_init(G, C, q, r, **options)
    assert not offset and A.shape == (r, n) and B.shape == (m, r)
    A_ref, B_ref = reference_factors(D, A0, scale=scale, s=s)
    A_al, signs = align_signs(A, A_ref)
    np.testing.assert_allclose(A_al, A_ref, rtol=0, atol=1e-6 * np.abs(A_ref).max())
    np.testing.assert_allclose(B * signs[None, :], B_ref, rtol=0, atol=1e-6 * np.abs(B_ref).max())
    delta, delta_ref = s * B @ A, s * B_ref @ A_ref  # sign-free: the init's step
    assert np.linalg.norm(delta - delta_ref) <= 1e-6 * np.linalg.norm(delta_ref)
    if scale == "paper":  # s B A is the Fisher-gradient displacement projected onto the subspace
        np.testing.assert_allclose(delta, D @ A0 @ A0.T, atol=1e-6 * np.abs(D).max())


def test_output_damping_ratio_and_variance_weight_enter_as_the_reference_says():
    m, n, r = 20, 30, 3
    G, C, q = statistics(m, n, seed=2)
    N = balanced_N(G, C, q)
    for opts, ref_kw in [({"output_damping_ratio": 0.5, "num_samples": N}, {"ratio": 0.5, "N": N}),
                         ({"variance_weight": 0.03, "num_samples": N // 30 + 1}, {"beta": 0.03, "N": N // 30 + 1})]:
        D, _, _, A0 = reference(G, C, q, r, **ref_kw)
        A, B, s, _ = run_init(G, C, q, r, **opts)
        A_ref, B_ref = reference_factors(D, A0, scale="stable", s=s)
        assert np.linalg.norm(B @ A - B_ref @ A_ref) <= 1e-6 * np.linalg.norm(B_ref @ A_ref), opts


def test_balance_keeps_the_product_and_orthogonalizes_b():
    m, n, r = 24, 40, 4
    G, C, q = statistics(m, n, seed=3)
    A, B, s, _ = run_init(G, C, q, r, variance_weight=0.0)
    Ab, Bb, _, _ = run_init(G, C, q, r, variance_weight=0.0, balance=True)
    np.testing.assert_allclose(Bb @ Ab, B @ A, atol=1e-7 * np.abs(B @ A).max())
    S = np.linalg.svd(B, compute_uv=False)  # B' = U sqrt(S): B'^T B' = diag(S)
    np.testing.assert_allclose(Bb.T @ Bb, np.diag(S), atol=1e-6 * S.max())


# ------------------------------------------------------------------------------- the paper's claims, which can fail

def test_subspace_minimizes_the_modeled_error_better_than_random_and_gradient_subspaces():
    """Theorem (Ky Fan): A0 minimizes ||D (I - P)||^2 + tr(P V)/N over r-dimensional subspaces. Checked against 500
    random subspaces, LoRA-GA / LoRA-One's top right singular vectors of G, and the bias-only choice (top of D)."""
    m, n, r = 24, 40, 4
    G, C, q = statistics(m, n, seed=4, cond=1e4)
    N = balanced_N(G, C, q)
    D, omega, evals, _ = reference(G, C, q, r, N=N)
    Z_inv = np.linalg.inv((C + C.T) / 2 + LAM * np.eye(n))
    y = 1.0 / (q + LAM)
    A, _, _, _ = run_init(G, C, q, r, num_samples=N)
    A_unit = A * math.sqrt(1024.0)  # stable scale: A = A0^T / sqrt(gamma)
    np.testing.assert_allclose(A_unit @ A_unit.T, np.eye(r), atol=1e-6)
    f_da = objective(D, Z_inv, y, A_unit, beta=1.0, N=N)
    assert f_da == pytest.approx(np.linalg.norm(D) ** 2 + evals[:r].sum(), rel=1e-6)
    rng = np.random.default_rng(0)
    f_random = min(objective(D, Z_inv, y, np.linalg.qr(rng.standard_normal((n, r)))[0].T, beta=1.0, N=N)
                   for _ in range(500))
    f_grad = objective(D, Z_inv, y, np.linalg.svd(G)[2][:r], beta=1.0, N=N)
    f_bias = objective(D, Z_inv, y, np.linalg.svd(D)[2][:r], beta=1.0, N=N)
    assert f_da < 0.99 * min(f_random, f_grad, f_bias), (f_da, f_random, f_grad, f_bias)
    # the variance term moves the subspace: without it the init differs
    A_no, _, _, _ = run_init(G, C, q, r, variance_weight=0.0)
    P, P_no = A_unit.T @ A_unit, 1024.0 * A_no.T @ A_no
    assert np.linalg.norm(P - P_no) > 0.1


def test_degenerate_case_is_lora_one():
    """Remark 4.3: no variance term and an identity Fisher (Z = I, Y = I): the subspace is the top r right singular
    vectors of G and the stable init equals LoRA-One's, s B A = -(s / (gamma sigma_1)) G_r."""
    m, n, r, gamma = 24, 40, 4, 64.0
    G, _, _ = statistics(m, n, seed=5)
    C, q = (1 - LAM) * np.eye(n), np.full(m, 1 - LAM)
    A, B, s, _ = run_init(G, C, q, r, variance_weight=0.0, stable_gamma=gamma)
    U, S, Vt = np.linalg.svd(G)
    np.testing.assert_allclose(gamma * A.T @ A, Vt[:r].T @ Vt[:r], atol=1e-6)
    G_r = (U[:, :r] * S[:r]) @ Vt[:r]
    np.testing.assert_allclose(s * B @ A, -s / (gamma * S[0]) * G_r, atol=1e-7 * s / gamma)
    lin = nn.Linear(n, m, bias=False).double()
    ctx = LayerContext("x", lin, rank=r, alpha=16.0, scaling=s, stats={"gradient": torch.from_numpy(G)})
    one = lowrank.get_initializer("lora_one")(gamma=gamma).init_layer(ctx)
    np.testing.assert_allclose((one.B @ one.A).double().numpy(), B @ A, atol=1e-7 / gamma)


# --------------------------------------------------------------------------------------------------- the statistic

def _padded(n=3):
    out = batches("bert", n)
    for i, b in enumerate(out):
        b["attention_mask"] = b["attention_mask"].clone()
        b["attention_mask"][0, 5:] = 0
        b["attention_mask"][2, 7 - i:] = 0
    return out


def _output_gradients(model, modules, data):
    """Per layer, ``(sum over non-padding rows of g^2, their number, max |g| over padding rows)`` in float64, from
    tensor hooks on the outputs and ``model(**batch).loss.backward()`` per batch."""
    acc = {n: [torch.zeros(m.weight.shape[0], dtype=torch.float64), 0, 0.0] for n, m in modules.items()}
    mask = {}

    def hook(name):
        def fn(module, args, out):
            def grad(g):
                g = g.double()
                acc[name][0] += g[mask["m"]].square().sum(0)
                acc[name][1] += int(mask["m"].sum())
                acc[name][2] = max(acc[name][2], g[~mask["m"]].abs().max().item() if (~mask["m"]).any() else 0.0)
            out.register_hook(grad)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for b in data:
            mask["m"] = b["attention_mask"].bool()
            model.zero_grad(set_to_none=True)
            model(**b).loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return acc


def test_output_gradient_moment_matches_hooks_with_padding_and_joins_the_gradient_pass():
    model, data = tiny_bert(), _padded()
    mods = {n: m for n, m in model.named_modules() if n.endswith(("query", "intermediate.dense"))}
    both = collect_statistics(model, mods, data, None, ("gradient", "covariance", "output_gradient_moment"),
                              progress=False)
    alone = collect_statistics(model, mods, data, None, ("gradient",), progress=False)
    ref = _output_gradients(model, mods, data)
    for name in mods:
        total, rows, pad_max = ref[name]
        assert pad_max == 0.0  # the loss does not see padded outputs: their g is 0 (the statistic relies on it)
        assert int(both[name]["output_rows"]) == rows == int(both[name]["rows"]) == 3 * 4 * 9 - (3 * 4 + 2 + 3 + 4)
        torch.testing.assert_close(both[name]["output_gradient_moment"].double(), total / rows, rtol=1e-5,
                                   atol=1e-7 * total.max().item() / rows)
        assert torch.equal(both[name]["gradient"], alone[name]["gradient"])


# ------------------------------------------------------------------------------------------------------ end to end

def _numpy_factors(stats, r, s, **kw):
    G, C, q = (stats[k].double().numpy() for k in ("gradient", "covariance", "output_gradient_moment"))
    D, _, _, A0 = reference(G, C, q, r, **kw)
    return reference_factors(D, A0, scale="stable", s=s)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_inject_matches_the_reference_and_offset_preserves_the_output(kind):
    factory, targets, _, _ = MODELS[kind]
    data, N, r = batches(kind, 3), 100, 2
    probe = {k: v for k, v in batches(kind, 1, seed=7)[0].items() if k != "labels"}
    base = factory()
    with torch.no_grad():
        y0 = base(**probe).logits
    mods = {n: m for n, m in base.named_modules() if n.endswith(tuple(targets))}
    stats = collect_statistics(base, mods, data, None, ("gradient", "covariance", "output_gradient_moment"),
                               progress=False)
    moved = {}
    for offset in (False, True):
        model = factory()
        cfg = LoRAConfig(rank=r, alpha=4, targets=targets, init="lora_da", scaling="rslora",
                         init_options={"num_samples": N, "offset": offset, "progress": False})
        lowrank.inject(model, cfg, data=data, progress=False)
        layers = dict(lowrank.adapted_layers(model))
        assert set(layers) == set(mods)
        for name, layer in layers.items():
            A_ref, B_ref = _numpy_factors(stats[name], r, layer.scaling, N=N)
            A, B = layer.A.detach().double().numpy(), layer.B.detach().double().numpy()
            A, signs = align_signs(A, A_ref)
            np.testing.assert_allclose(A, A_ref, atol=1e-5 * np.abs(A_ref).max())
            np.testing.assert_allclose(B * signs[None, :], B_ref, atol=1e-5 * np.abs(B_ref).max())
            assert layer.offset == offset
        with torch.no_grad():
            moved[offset] = (model(**probe).logits - y0).abs().max().item()
    scale = y0.abs().max().item()
    assert moved[True] <= 1e-5 * scale, moved  # offset: W0 - s B A, the output is unchanged
    assert moved[False] > 1e-4 * scale, moved  # the paper's init: the adapter starts at the projected step


# ------------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("options,match", [
    ({"scale": "unit"}, r"invalid scale='unit': must be one of \('stable', 'paper'\)"),
    ({"num_samples": 0}, "invalid num_samples=0: must be a positive int"),
    ({"num_samples": 2.5}, "num_samples=2.5 of initializer 'lora_da' must be an integer"),
    ({"num_samples": True}, "num_samples=True of initializer 'lora_da' must be an integer"),
    ({"variance_weight": -1.0}, r"invalid variance_weight=-1.0: must be >= 0"),
    ({"variance_weight": float("nan")}, "variance_weight=nan of initializer 'lora_da' must be a finite number"),
    ({"damping": 0.0}, r"invalid damping=0.0: must be > 0"),
    ({"stable_gamma": -2.0}, r"invalid stable_gamma=-2.0: must be > 0"),
    ({"output_damping_ratio": 0.0}, r"invalid output_damping_ratio=0.0: must be > 0"),
    ({"balance": 1}, "balance=1 of initializer 'lora_da' must be true or false"),
])
def test_bad_options_raise_clearly(options, match):
    with pytest.raises(ValueError, match=match):
        lowrank.get_initializer("lora_da")(**options)


def test_bad_layers_raise_with_the_layer_and_the_fix():
    G, C, q = statistics(6, 5, seed=6)
    with pytest.raises(ValueError, match=r"r <= d_in .* r=6 and layer 'enc.q' has d_in=5; use rank <= 5"):
        run_init(G, C, q, 6, name="enc.q", variance_weight=0.0)
    with pytest.raises(ValueError, match=r"layer 'enc.q' has an input covariance that is not positive definite"):
        run_init(G, -np.eye(5), q, 2, name="enc.q", variance_weight=0.0)
    with pytest.raises(ValueError, match=r"layer 'enc.q' has a zero gradient"):
        run_init(np.zeros_like(G), C, q, 2, name="enc.q", variance_weight=0.0)


def test_without_num_samples_it_warns_that_the_variance_term_is_dropped():
    G, C, q = statistics(12, 10, seed=8)
    with pytest.warns(UserWarning, match=r"no num_samples .* variance term .* is dropped"):
        A, B, _, _ = run_init(G, C, q, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A0, B0, _, _ = run_init(G, C, q, 2, variance_weight=0.0)
    np.testing.assert_array_equal(B @ A, B0 @ A0)
