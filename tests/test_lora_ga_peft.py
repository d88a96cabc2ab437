"""``lora_ga`` with ``variant="peft"`` reproduces PEFT's ``preprocess_loraga`` + ``get_peft_model`` (PEFT is the
reference): the same factors and offset base to 1e-5 on tiny BERT, GPT-2 (``Conv1D``) and Llama, every direction
and scale PEFT has. The one thing the test aligns is the random draws of ``torch.svd_lowrank`` (PEFT's come from
the global RNG, lowrank's from the layer's generator): both sides get the same seed per call."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lowrank
from lowrank import LoRAConfig
from lowrank.theory import alignment, init_factors
from tests.conftest import MODELS, batches

peft = pytest.importorskip("peft")

SCALES = {"stable": "stable", "unit": "unit", "weight": "weight_svd", "gd": "gd_scale"}


@pytest.fixture
def same_draws(monkeypatch):
    """``torch.svd_lowrank`` with the same seed on every call, for PEFT and lowrank alike."""
    original = torch.svd_lowrank

    def seeded(A, q=6, niter=2, M=None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            return original(A, q=q, niter=niter, M=M)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)


def peft_reference(model, targets, data, rank, alpha, direction, scale):
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=True,
                          init_lora_weights="lora_ga",
                          lora_ga_config=peft.LoraGAConfig(direction=direction, scale=SCALES[scale]))

    def train_step():
        for b in data:
            model(**b).loss.backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.tuners.lora.preprocess_loraga(model, cfg, train_step)
        pm = peft.get_peft_model(model, cfg)
    out = {}
    for name, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            base = m.get_base_layer()
            w = base.weight.T if getattr(m, "fan_in_fan_out", False) else base.weight
            out[name.removeprefix("base_model.model.")] = (m.lora_A["default"].weight, m.lora_B["default"].weight, w)
    return out


def lowrank_variant(model, targets, data, rank, alpha, direction, scale):
    cfg = LoRAConfig(rank=rank, alpha=alpha, scaling="rslora", targets=list(targets), init="lora_ga",
                     init_options={"variant": "peft", "direction": direction, "scale": scale, "progress": False})
    lowrank.inject(model, cfg, data=data, progress=False)
    return {n: (layer.A, layer.B, layer.base_weight()) for n, layer in lowrank.adapted_layers(model)}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("A2rBr", "unit"), ("ArBr", "weight"),
                                             ("ArB2r", "gd")])
def test_variant_peft_matches_peft_lora_ga(kind, direction, scale, same_draws):
    factory, targets = MODELS[kind][0], {"bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"],
                                         "llama": ["q_proj", "v_proj", "down_proj"]}[kind]
    data, base = batches(kind, 3), factory()
    theirs = peft_reference(copy.deepcopy(base), targets, data, 4, 8, direction, scale)
    ours = lowrank_variant(copy.deepcopy(base), targets, data, 4, 8, direction, scale)
    assert ours.keys() == theirs.keys() and ours
    for name, (A, B, W) in ours.items():
        tA, tB, tW = theirs[name]
        torch.testing.assert_close(A, tA, rtol=1e-5, atol=1e-5, msg=f"{name}: A")
        torch.testing.assert_close(B, tB, rtol=1e-5, atol=1e-5, msg=f"{name}: B")
        torch.testing.assert_close(W, tW, rtol=1e-5, atol=1e-5, msg=f"{name}: the offset base")


def test_variant_peft_random_direction_shares_one_index_set_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(24, 20, generator=g, dtype=torch.float64)
    layer = torch.nn.Linear(20, 24)
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    A, B = _factors_from(G, layer, direction="random", scale="unit", svd="auto")  # torch.svd_lowrank, seeded
    assert torch.equal(torch.random.get_rng_state(), before)
    U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    ia = [int((Vh[:8].abs() @ a.abs()).argmax()) for a in A]  # A's rows are right singular vectors of G
    ib = [int((U[:, :8].abs().T @ b.abs()).argmax()) for b in B.T]  # B's columns are left ones
    assert ia == ib and len(set(ia)) == 4


def _factors_from(G, layer, **opts):
    from lowrank.init.driver import LayerSpec, run_initializer

    spec = LayerSpec("layer", layer, 4, 8.0, 8.0 / 2)
    init = lowrank.get_initializer("lora_ga")(variant="peft", **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (res,) = run_initializer(init, [spec], seed=0, stats={"layer": {"gradient": G.float()}})
    return res.A, res.B


def test_variant_peft_first_step_is_off_the_theorem_and_the_paper_is_on_it():
    """The paper's first step is ``zeta G_2r`` (sine ~1e-7); PEFT's multiplies ``B`` by singular values and is
    not (its sine to ``G_2r`` is far from 0 on a gradient with a spread spectrum)."""
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    V, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    G = U[:, :24] @ torch.diag(torch.logspace(1, -2, 24)) @ V.T
    sines = {}
    for variant in ("paper", "peft"):
        res, s = init_factors("lora_ga", G, rank=4, init_options={"variant": variant, "svd": "full", "progress": False})
        sines[variant] = alignment(res.A, res.B, s, G).rel_error_2r
    assert sines["paper"] < 1e-5 and sines["peft"] > 0.1, sines


def test_variant_peft_follows_the_peft_release_on_conv1d_stable_scale():
    """PEFT 0.21 took ``m`` of the stable scale from the stored weight (``d_in`` on a ``Conv1D``), 0.22 takes
    ``out_features``: ``peft_version`` picks one, ``None`` follows the installed PEFT."""
    from transformers.pytorch_utils import Conv1D

    from lowrank.init.lora_ga import installed_peft, peft_release

    g = torch.Generator().manual_seed(3)
    G = torch.randn(48, 12, generator=g)  # (d_out, d_in): a Conv1D stores its weight as (12, 48)
    layer = Conv1D(48, 12)
    B = {v: _factors_from(G, layer, scale="stable", svd="full", peft_version=v)[1] for v in ("0.21.0", "0.22", None)}
    ratio = float(B["0.21.0"].norm() / B["0.22"].norm())
    assert abs(ratio - (12 / 48) ** 0.25) < 1e-5, ratio
    newest = peft_release(installed_peft() or "0.22") >= (0, 22)
    torch.testing.assert_close(B[None], B["0.22"] if newest else B["0.21.0"])
    with pytest.raises(ValueError, match="invalid peft_version='latest'"):
        lowrank.get_initializer("lora_ga")(variant="peft", peft_version="latest")
