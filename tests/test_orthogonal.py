"""``orthogonal``: PEFT's orthogonal init (PEFT is the reference, under a shared seed), ``B A = 0`` in float64
reference math, and an odd rank refused naming the layer."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from lowrank.init.orthogonal import orthogonal_factors
from tests.conftest import Snapshot, tiny_llama

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_orthogonal_matches_peft_under_a_shared_seed(rank):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=rank, target_modules=["q_proj", "down_proj"],
                                                               init_lora_weights="orthogonal"))
    layers = [m for m in pm.modules() if hasattr(m, "orthogonal_init") and "default" in getattr(m, "lora_A", {})]
    assert layers
    for i, layer in enumerate(layers):
        torch.manual_seed(100 + i)
        layer.orthogonal_init("default")  # PEFT's own function, from the global RNG
        base = layer.get_base_layer()
        A, B = orthogonal_factors(base.out_features, base.in_features, rank, torch.Generator().manual_seed(100 + i))
        torch.testing.assert_close(A, layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)


def test_the_update_is_zero_and_both_factors_are_not():
    A, B = orthogonal_factors(48, 32, 8, torch.Generator().manual_seed(0))
    assert A.norm() > 0.5 and B.norm() > 0.5
    assert (B.double() @ A.double()).abs().max() < 1e-6 * (B.norm() * A.norm())  # Q_even Q_odd^T = 0
    model = tiny_llama()
    x = torch.randint(0, 97, (2, 7))
    y0 = model(x).logits
    out = lowrank.inject(model, lowrank.LoRAConfig(rank=4, targets=["q_proj", "v_proj"], init="orthogonal"),
                         progress=False)
    torch.testing.assert_close(out(x).logits, y0, rtol=1e-5, atol=1e-6)
    assert all(not layer.offset and layer.B.abs().sum() > 0 for _, layer in lowrank.adapted_layers(out))


def test_an_odd_rank_is_refused_naming_the_layer_and_the_model_is_unchanged():
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"orthogonal needs an even rank .* layer 'model.layers.0.self_attn.q_proj' "
                                         r"has rank 3; use rank 4 or 2"):
        lowrank.inject(model, lowrank.LoRAConfig(rank=3, targets=["q_proj"], init="orthogonal"), progress=False)
    snap.assert_unchanged()
