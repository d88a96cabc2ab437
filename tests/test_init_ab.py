"""``init_ab`` (Init[AB], arXiv 2505.23194 as the re-test arXiv 2602.04998 runs it): both factors uniform with bound
``1 / sqrt(d_in)`` (float64 reference statistics), the base offset so the output is unchanged, and without the
offset the output moves by exactly ``s B0 A0 x``."""

from __future__ import annotations

import math

import pytest
import torch

import lowrank
from lowrank.init.driver import LayerSpec, run_initializer
from lowrank.weights import original_weight
from tests.conftest import tiny_llama


def _factors(m=600, n=400, r=16, **opts):
    layer = torch.nn.Linear(n, m)
    (res,) = run_initializer(lowrank.get_initializer("init_ab")(**opts), [LayerSpec("x", layer, r, 16.0, 4.0)], seed=3)
    return res


def test_both_factors_are_uniform_with_the_layers_input_bound():
    res = _factors()
    bound = 1 / math.sqrt(400)
    for t in (res.A.double(), res.B.double()):
        assert t.abs().max() <= bound and t.abs().max() > 0.99 * bound
        assert t.var().item() == pytest.approx(bound ** 2 / 3, rel=0.03)  # U(-c, c) has variance c^2 / 3
        assert abs(t.mean().item()) < 0.01 * bound
    assert res.offset and torch.equal(res.A, _factors().A)  # seeded per layer
    half = _factors(b_scale=0.5)
    assert half.B.abs().max() <= bound / 2 and torch.equal(half.A, res.A)


def test_the_offset_keeps_the_output_and_without_it_the_noise_stays():
    x = torch.randint(0, 97, (2, 7))
    base = tiny_llama()
    y0 = base(x).logits
    w0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = lowrank.LoRAConfig(rank=4, targets=["q_proj", "v_proj"], init="init_ab", scaling="rslora")
    model = lowrank.inject(tiny_llama(), cfg, progress=False)
    torch.testing.assert_close(model(x).logits, y0, rtol=1e-5, atol=1e-5)
    layer = dict(lowrank.adapted_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.offset and layer.A.abs().sum() > 0 and layer.B.abs().sum() > 0
    torch.testing.assert_close(original_weight(layer), w0, rtol=0, atol=1e-6)
    noisy = lowrank.inject(tiny_llama(), cfg.replace(init_options={"offset": False}), progress=False)
    noisy_layer = dict(lowrank.adapted_layers(noisy))["model.layers.0.self_attn.q_proj"]
    assert not noisy_layer.offset and torch.equal(noisy_layer.base_weight(), w0)
    assert torch.equal(noisy_layer.A, layer.A) and torch.equal(noisy_layer.B, layer.B)
    assert not torch.allclose(noisy(x).logits, y0, atol=1e-4)


def test_bad_scales_are_named():
    with pytest.raises(ValueError, match=r"invalid a_scale=0.0: must be a finite number > 0"):
        lowrank.LoRAConfig(rank=2, targets=["q_proj"], init="init_ab", init_options={"a_scale": 0.0})
