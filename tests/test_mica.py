"""``mica``: B equals PEFT's ``init_lora_weights="mica"`` and a float64 reference (the minor left singular
vectors), B stays fixed through training steps, save/load and the optimizer, and pairings that would train B
are refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import lowrank
from lowrank import LoRAConfig
from lowrank.optim import PreconditionedOptimizer
from tests.conftest import batches, tiny_llama

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def cfg(rank=4, **kw):
    return LoRAConfig(rank=rank, targets=TARGETS, init="mica", **kw)


@pytest.mark.parametrize("rank", [2, 4])
def test_b_matches_peft_and_the_float64_minor_subspace(rank):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=rank, target_modules=TARGETS, init_lora_weights="mica"))
    model = lowrank.inject(tiny_llama(), cfg(rank), progress=False)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
                   if "default" in getattr(m, "lora_B", {})}
    for name, layer in lowrank.adapted_layers(model):
        theirs = peft_layers[name].lora_B["default"].weight
        torch.testing.assert_close(layer.B, theirs, rtol=1e-5, atol=1e-6)
        assert not theirs.requires_grad and not layer.B.requires_grad and layer.A.requires_grad
        assert torch.equal(layer.A, torch.zeros_like(layer.A))
        # float64: B spans the r smallest singular directions of W0 (projector equality, sign-free)
        W = layer.base_layer.weight.detach().double().numpy()
        U = np.linalg.svd(W, full_matrices=False)[0][:, -rank:]
        B = layer.B.detach().double().numpy()
        assert np.abs(B @ B.T - U @ U.T).max() < 1e-5
        assert np.abs(B.T @ B - np.eye(rank)).max() < 1e-5


def test_b_stays_fixed_through_training_and_reload(tmp_path):
    model = lowrank.inject(tiny_llama(), cfg(), progress=False)
    B0 = {n: layer.B.detach().clone() for n, layer in lowrank.adapted_layers(model)}
    opt = PreconditionedOptimizer(model, "adamw", "identity", lr=1e-2, weight_decay=0.1)
    assert all(id(layer.B) not in {id(p) for g in opt.param_groups for p in g["params"]}
               for _, layer in lowrank.adapted_layers(model))
    for b in batches("llama", n=3):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    for name, layer in lowrank.adapted_layers(model):
        assert torch.equal(layer.B, B0[name]) and layer.A.abs().sum() > 0
    lowrank.save_adapter(model, tmp_path / "a")
    fresh = lowrank.load_adapter(tiny_llama(), tmp_path / "a")
    for (_, a), (_, b) in zip(lowrank.adapted_layers(model), lowrank.adapted_layers(fresh)):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and not b.B.requires_grad


def test_preconditioners_that_would_move_b_are_refused():
    model = lowrank.inject(tiny_llama(), cfg(), progress=False)
    with pytest.raises(ValueError, match=r"keeps B fixed.*Riemannian.*preconditioner='identity'"):
        PreconditionedOptimizer(model, "adamw", "riemannian", lr=1e-3)
    with pytest.raises(ValueError, match=r"keeps B fixed.*trains no A either"):
        PreconditionedOptimizer(model, "adamw", "lora_fa", lr=1e-3)
