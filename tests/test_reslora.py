"""ResLoRA (arXiv 2402.18039): the three shortcuts against the paper's equations in float64 on a 3-block model,
the links to the previous block, the merges (exact for block, the input-norm approximation for input and middle),
the gradient reaching the previous block, save/load with the merge's statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from tests.conftest import tiny_llama


class Toy(nn.Module):
    """Three blocks ``x <- tanh(proj(x))`` of width 6, plus a head of another shape (never linked)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(6, 6)}) for _ in range(3))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        for block in self.layers:
            x = torch.tanh(block["proj"](x))
        return self.head(x)


def _model(variant, pre_num=2):
    model = Toy().double()
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, alpha=2, targets=["proj"], adapter="reslora",
                                             adapter_options={"variant": variant, "pre_num": pre_num}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lowrank.adapted_layers(model):
            layer.B.copy_(0.5 * torch.randn(layer.B.shape, generator=g, dtype=torch.float64))
    return model


def _reference(model, x, variant, pre_num=2):
    """The paper's equations, layer by layer."""
    layers = [layer for _, layer in lowrank.adapted_layers(model)]
    xs, xas = [], []
    for n, layer in enumerate(layers):
        W, b, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling
        A, B = layer.A, layer.B
        if variant == "input":
            prev = xs[n - 1] if n else x
            upd = s * (x + prev) @ A.T @ B.T
        elif variant == "block":
            upd = s * sum(x @ layers[n - k].A.T @ layers[n - k].B.T for k in range(0, min(pre_num, n) + 1))
        else:
            upd = s * (x @ A.T + sum(xas[n - k] for k in range(1, min(pre_num, n) + 1))) @ B.T
        xs.append(x)
        xas.append(x @ A.T)
        x = torch.tanh(x @ W.T + b + upd)
    return model.head(x)


@pytest.mark.parametrize("variant", ["input", "block", "middle"])
def test_each_shortcut_is_the_papers_equation(variant):
    model = _model(variant)
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), _reference(model, x, variant), rtol=1e-12, atol=1e-12)
    names = [n for n, _ in lowrank.adapted_layers(model)]
    layers = dict(lowrank.adapted_layers(model))
    assert layers[names[0]].previous is None and layers[names[2]].previous is layers[names[1]]


def test_the_block_shortcut_sends_gradient_to_the_previous_blocks_and_merges_exactly():
    model = _model("block")
    x = torch.randn(4, 6, dtype=torch.float64)
    layers = [layer for _, layer in lowrank.adapted_layers(model)]
    model(x).sum().backward()
    g_with = layers[0].B.grad.clone()
    for layer in layers:
        layer.B.grad = None
    layers[1].__dict__["previous"] = None  # cut the links: block 0's B gets less gradient
    layers[2].__dict__["previous"] = None
    model(x).sum().backward()
    assert not torch.allclose(layers[0].B.grad, g_with)
    model = _model("block")
    model.eval()
    with torch.no_grad():
        want = model(x)
        lowrank.merge(model)
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["input", "middle"])
def test_the_input_norm_merge(variant):
    model = _model(variant)
    model.train()
    data = [torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    for x in data:
        model(x)
    layers = [layer for _, layer in lowrank.adapted_layers(model)]
    norms = [layer.mean_norm() for layer in layers]  # the mean input norms each layer saw in training
    assert all(v > 0 for v in norms)
    n = 2
    s, A, B = layers[n].scaling, layers[n].A, layers[n].B
    if variant == "input":
        want = (1 + norms[1] / norms[2]) * s * B @ A
    else:
        want = s * B @ (A + norms[1] / norms[2] * layers[1].A + norms[0] / norms[2] * layers[0].A)
    torch.testing.assert_close(layers[n].delta_weight(), want, rtol=1e-12, atol=1e-12)


def test_save_and_load_keep_the_links_and_the_merge_statistics(tmp_path):
    model = _model("middle").float()
    model.train()
    for i in range(3):
        model(torch.randn(4, 6))
    x = torch.randn(2, 6)
    model.eval()  # (a training-mode forward would add its input norm to the statistics)
    with torch.no_grad():
        want = model(x)
        merged = {n: layer.delta_weight() for n, layer in lowrank.adapted_layers(model)}
    lowrank.save_adapter(model, tmp_path)
    loaded = lowrank.load_adapter(Toy(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want)
        for n, layer in lowrank.adapted_layers(loaded):
            torch.testing.assert_close(layer.delta_weight(), merged[n])


def test_it_runs_on_a_transformer_and_is_refused_by_the_peft_export(tmp_path):
    model = lowrank.inject(tiny_llama(), lowrank.LoRAConfig(rank=2, targets=["q_proj", "down_proj"], adapter="reslora"))
    layers = dict(lowrank.adapted_layers(model))
    assert layers["model.layers.1.self_attn.q_proj"].previous is layers["model.layers.0.self_attn.q_proj"]
    assert layers["model.layers.1.mlp.down_proj"].previous is layers["model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="adapter 'reslora' cannot be exported to PEFT: PEFT has no such adapter"):
        lowrank.peft.export(model, tmp_path)
    with pytest.raises(ValueError, match="invalid variant='shortcut'"):
        lowrank.LoRAConfig(rank=2, targets=["q_proj"], adapter="reslora", adapter_options={"variant": "shortcut"})
