"""CorDA (arXiv 2406.05223) against a float64 reference of its formulas, and against PEFT's
``preprocess_corda`` given the same covariance (PEFT's ``covariance_file``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from lowrank import LoRAConfig
from lowrank.init.corda import damped_inverse

from .conftest import Snapshot, batches, tiny_bert
from .test_statistics import _inputs, _padded

TARGETS = ["query", "value", "output.dense"]


def _reference(W0: torch.Tensor, X: torch.Tensor, r: int, mode: str, d: float = 0.01):
    """Float64: C = X^T X / N damped by d mean(diag C); W0 C' = U S V^T; the adapter's part U_I S_I V_I^T C'^-1."""
    W0, X = W0.double(), X.double()
    C = X.T @ X / X.shape[0]
    Cd = C + d * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    U, S, Vh = torch.linalg.svd(W0 @ Cd, full_matrices=False)
    idx = slice(0, r) if mode == "ipm" else slice(S.numel() - r, S.numel())
    return U[:, idx] @ torch.diag(S[idx]) @ Vh[idx] @ torch.linalg.inv(Cd)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_its_float64_definition_and_keeps_the_output(mode):
    data = _padded(4)
    model = tiny_bert()
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    mods = {n: m for n, m in model.named_modules() if n in W0}
    X = _inputs(model, mods, data)
    b = batches("bert", 1, seed=9)[0]
    with torch.no_grad():
        y0 = model(input_ids=b["input_ids"]).logits
    cfg = LoRAConfig(targets=TARGETS, rank=3, alpha=6, init="corda", init_options={"mode": mode, "progress": False})
    lowrank.inject(model, cfg, data=data, progress=False)
    for name, layer in lowrank.adapted_layers(model):
        ref = _reference(W0[name], X[name], 3, mode)
        got = layer.scaling * (layer.B.detach().double() @ layer.A.detach().double())
        # float32 statistics: errors relative to W0's scale (the KPM part itself is ~3% of it here)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * W0[name].abs().max().item())
        # balanced factors: A = sqrt(S / s) V^T C'^-1 and B = U sqrt(S / s), so B^T B = diag(S) / s
        btb = layer.B.detach().double().T @ layer.B.detach().double()
        torch.testing.assert_close(btb, torch.diag(btb.diagonal()), rtol=0, atol=1e-5 * btb.abs().max().item())
        torch.testing.assert_close(layer.base_weight().double(), W0[name].double() - ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=b["input_ids"]).logits, y0, rtol=1e-4, atol=1e-5)


def test_kpm_adapts_the_components_ipm_leaves():
    data = _padded(4)
    layers = {}
    for mode in ("ipm", "kpm"):
        model = lowrank.inject(tiny_bert(), LoRAConfig(targets=["query"], rank=2, init="corda",
                                                       init_options={"mode": mode, "progress": False}),
                               data=data, progress=False)
        layers[mode] = dict(lowrank.adapted_layers(model))
    for name, ipm in layers["ipm"].items():
        kpm = layers["kpm"][name]
        s_ipm = torch.linalg.svdvals(ipm.B.detach() @ ipm.A.detach())[0]
        s_kpm = torch.linalg.svdvals(kpm.B.detach() @ kpm.A.detach())[0]
        assert s_kpm < s_ipm  # the bottom components carry less of W0 C


def test_singular_covariance_beyond_the_damping_is_a_clear_error():
    C = torch.diag(torch.tensor([1.0, 1.0, 0.0]))
    Cd, inv, d = damped_inverse(C, damping=0.01, tol=0.05, max_doublings=0)  # 0.01 mean(diag) suffices
    torch.testing.assert_close(Cd @ inv, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match=r"corda: layer 'q' has an input covariance singular beyond the damping.*"
                                         r"raise init_options\['damping'\]"):
        v, w = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, -1.0])  # rank 2 in 3 dimensions
        damped_inverse(torch.outer(v, v) + torch.outer(w, w), damping=1e-20, tol=0.05, max_doublings=2, name="q")
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"corda: layer '.*query' has an input covariance singular beyond"):
        lowrank.inject(model, LoRAConfig(targets=["query"], rank=2, init="corda",
                                         init_options={"damping": 1e-20, "damping_tol": 1e-9, "max_doublings": 1,
                                                       "progress": False}),
                       data=batches("bert", 1, bsz=1, seq=3), progress=False)  # 3 rows for 32 dimensions
    snap.assert_unchanged()
    with pytest.raises(ValueError, match=r"zero or not finite"):
        damped_inverse(torch.zeros(3, 3), damping=0.01, tol=0.05, max_doublings=3)


def test_corda_agrees_with_peft_given_the_same_covariance(tmp_path):
    """PEFT builds its covariance differently (each sample divided by its signed maximum, padding included);
    handed lowrank's covariance through its ``covariance_file``, its decomposition must give lowrank's factors."""
    pytest.importorskip("attr")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from lowrank.init.collect import collect_statistics

    data = _padded(4)
    targets = ["query", "value"]
    model = tiny_bert()
    mods = {n: m for n, m in model.named_modules() if n.endswith(tuple(targets))}
    stats = collect_statistics(model, mods, data, None, ("covariance",), progress=False)
    torch.save({n: s["covariance"] for n, s in stats.items()}, tmp_path / "cov.pt")
    ours = dict(lowrank.adapted_layers(lowrank.inject(
        tiny_bert(), LoRAConfig(targets=targets, rank=2, alpha=4, init="corda", init_options={"progress": False}),
        data=data, progress=False)))
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights="corda",
                          corda_config=CordaConfig(corda_method="ipm", covariance_file=str(tmp_path / "cov.pt")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_corda(model, cfg, run_model=lambda: None)
        pm = peft.get_peft_model(model, cfg)
    for name, layer in ours.items():
        theirs = pm.base_model.model.get_submodule(name)
        A, B = theirs.lora_A["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
        s = theirs.scaling["default"]
        torch.testing.assert_close(s * B @ A, layer.scaling * layer.B.detach() @ layer.A.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.base_layer.weight.detach(), layer.base_weight().detach(), rtol=0, atol=1e-5)
