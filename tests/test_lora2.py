"""LoRA² (arXiv 2408.06854): the forward and merged update against the formula in float64, the initialization,
the orthogonality term, the pruning schedule and scores against a float64 transcription of AdaLoRA's rules,
save/load, and a runner arm with pruning."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.adapters.lora2 import LoRA2Layer, LoRA2Pruner, lora2_loss
from tests.conftest import Snapshot, batches, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _model(dtype=torch.float64, **options):
    cfg = lowrank.LoRAConfig(rank=4, alpha=8, targets=TARGETS, adapter="lora2", init="lora2",
                             adapter_options={"k": 3, **options}, init_options={"k": 3})
    return lowrank.inject(tiny_llama(dtype), cfg)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lowrank.adapted_layers(model):
            for p in layer.adapter_parameters().values():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_forward_and_merge_are_the_product_of_the_two_planes():
    model = _model()
    _randomize(model)
    layer = dict(lowrank.adapted_layers(model))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(5, layer.d_in, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    dW = layer.scaling * layer.B2 @ layer.A2 @ torch.diag(layer.E) @ layer.B1 @ layer.A1
    want = x @ (W + dW).T + (0 if b is None else b)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), dW, rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    assert layer.scaling == 8 / 4  # c = alpha / r


def test_the_initialization_leaves_the_output_unchanged_and_draws_n_0_002():
    base = tiny_llama(torch.float32)
    with torch.no_grad():
        y0 = base(**batches("llama", 1)[0]).logits
    model = _model(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(**batches("llama", 1)[0]).logits, y0)
    values = torch.cat([p.detach().flatten() for _, layer in lowrank.adapted_layers(model)
                        for k, p in layer.adapter_parameters().items() if k != "E"])
    assert abs(float(values.std()) - 0.02) < 0.002
    assert all(not layer.E.any() for _, layer in lowrank.adapted_layers(model))
    with pytest.raises(ValueError, match=r"give the initializer the adapter's inner rank, init_options=\{'k': 3\}"):
        lowrank.inject(tiny_llama(), lowrank.LoRAConfig(rank=4, targets=TARGETS, adapter="lora2", init="lora2",
                                                        adapter_options={"k": 3}))


def test_the_orthogonality_term_is_the_mean_of_the_factor_norms():
    model = _model()
    _randomize(model, 1)
    eye = torch.eye(3, dtype=torch.float64)
    terms = []
    for _, layer in lowrank.adapted_layers(model):
        for P in (layer.A1, layer.A2):
            terms.append(torch.linalg.matrix_norm(P @ P.T - eye))
        for Q in (layer.B1, layer.B2):
            terms.append(torch.linalg.matrix_norm(Q.T @ Q - eye))
    want = 0.1 * torch.stack(terms).mean()
    torch.testing.assert_close(lora2_loss(model).double(), want.detach(), rtol=1e-6, atol=1e-8)
    lora2_loss(model).backward()
    assert all(p.grad is not None for _, layer in lowrank.adapted_layers(model)
               for k, p in layer.adapter_parameters().items() if k != "E")


def test_the_pruning_schedule_scores_and_masks_as_adalora():
    model = _model(target_rank=1, init_frac=0.1, final_frac=0.2, mask_interval=2)
    _randomize(model, 2)
    pruner = LoRA2Layer.training_hook(model, 20)
    assert isinstance(pruner, LoRA2Pruner) and (pruner.t_init, pruner.t_final, pruner.total_rank) == (2, 4, 16)
    # the cubic schedule: total 16, target 4 (1 per layer, 4 layers)
    for t, want in ((1, (16, False)), (2, (16, False)), (4, (4 + int(12 * (1 - 2 / 14) ** 3), True)),
                    (5, (4 + int(12 * (1 - 3 / 14) ** 3), False)), (17, (4, True)), (20, (4, True))):
        assert pruner.budget(t) == want, t
    # scores: EMAs of |p * grad| by hand (float64), one step
    model(**batches("llama", 1)[0]).loss.backward()
    layers = dict(lowrank.adapted_layers(model))
    want = {}
    for n, layer in layers.items():
        s = {k: (1 - 0.85) * (p * p.grad).abs() for k, p in (("E", layer.E), ("B1", layer.B1), ("A2", layer.A2))}
        s = {k: v * (1 - 0.85) * (v / (1 - 0.85) - v).abs() for k, v in s.items()}  # I' U' after one update
        want[n] = s["E"] + s["B1"].mean(1) + s["A2"].mean(0)
    assert pruner.step() is None  # step 1: before t_init, nothing masked
    for n, got in pruner.scores().items():
        torch.testing.assert_close(got.double(), want[n].detach(), rtol=1e-5, atol=1e-12)
    pruner.steps = 16  # the next step (17) is past T - t_final: mask down to the target
    budget = pruner.step()
    kept = sum(int(layer.E.count_nonzero()) for layer in layers.values())
    assert budget == 4 and kept == 4


def test_save_and_load_keep_the_inner_rank(tmp_path):
    model = _model(torch.float32)
    _randomize(model, 3)
    with torch.no_grad():
        want = model(**batches("llama", 1)[0]).logits
    lowrank.save_adapter(model, tmp_path)
    loaded = lowrank.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches("llama", 1)[0]).logits, want)
    with pytest.raises(ValueError, match="adapter 'lora2' cannot be exported to PEFT: PEFT has no such adapter"):
        lowrank.peft.export(model, tmp_path / "peft")


def test_bad_options_are_refused_with_the_model_unchanged():
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"init_frac \+ final_frac = 1 leaves no steps"):
        lowrank.inject(model, lowrank.LoRAConfig(rank=4, targets=TARGETS, adapter="lora2", init="lora2",
                                                 adapter_options={"init_frac": 0.5, "final_frac": 0.5}))
    with pytest.raises(ValueError, match=r"lora2's inner rank k=64 exceeds min\(d_out, d_in\) = 16"):
        lowrank.inject(model, lowrank.LoRAConfig(rank=4, targets=["k_proj"], adapter="lora2", init="lora2",
                                                 adapter_options={"k": 64}, init_options={"k": 64}))
    snap.assert_unchanged()
