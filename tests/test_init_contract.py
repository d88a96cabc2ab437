"""Contract tests run for every registered initializer (a newly registered one is covered automatically).

Shapes, dtypes (float32, bfloat16), finite values, output unchanged at step 0 (unless the
method declares ``preserves_output = False``), bitwise determinism under the seed, the global
RNG untouched, on ``nn.Linear`` (BERT, Llama) and ``Conv1D`` (GPT-2).
"""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank import LoRAConfig

from .conftest import MODELS, batches

INITS = lowrank.list_initializers()
KINDS = ["bert", "gpt2", "llama"]


def _inject(kind, init, dtype=torch.float32, seed=0, check_rng=False):
    factory, targets, _, _ = MODELS[kind]
    model = factory(dtype=dtype)
    cls = lowrank.get_initializer(init)
    data = batches(kind, 2) if cls.uses_data else None
    cfg = LoRAConfig(rank=2, alpha=4, targets=targets, init=init, scaling="rslora", seed=seed)
    rng = torch.get_rng_state()
    lowrank.inject(model, cfg, data=data, progress=False)
    if check_rng:
        assert torch.equal(torch.get_rng_state(), rng), "global RNG was used"
    return model


def _logits(model, kind):
    batch = batches(kind, 1, seed=3)[0]
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", INITS)
def test_shapes_finite_and_output_preserved_float32(init, kind):
    factory = MODELS[kind][0]
    y0 = _logits(factory(), kind)
    model = _inject(kind, init)
    layers = dict(lowrank.adapted_layers(model))
    assert layers
    for name, layer in layers.items():
        assert layer.A.shape == (2, layer.d_in) and layer.B.shape == (layer.d_out, 2), name
        assert layer.A.dtype == layer.B.dtype == torch.float32
        assert torch.isfinite(layer.A).all() and torch.isfinite(layer.B).all() and torch.isfinite(layer.base_weight()).all()
        assert layer.A.requires_grad and layer.B.requires_grad and not layer.base_layer.weight.requires_grad
    y1 = _logits(model, kind)
    if lowrank.get_initializer(init).preserves_output:
        torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5 * y0.abs().max().item())


@pytest.mark.parametrize("init", INITS)
def test_bfloat16_output_preserved_within_rounding(init):
    kind = "bert"
    factory = MODELS[kind][0]
    y0 = _logits(factory(dtype=torch.bfloat16), kind)
    model = _inject(kind, init, dtype=torch.bfloat16)
    for _, layer in lowrank.adapted_layers(model):
        assert layer.A.dtype == layer.B.dtype == layer.base_layer.weight.dtype == torch.bfloat16
    if lowrank.get_initializer(init).preserves_output:
        # a few bfloat16 ulps (2^-8 relative) of the logits, accumulated over two layers
        torch.testing.assert_close(_logits(model, kind), y0, rtol=2 ** -5, atol=2 ** -5 * y0.abs().max().item())


@pytest.mark.parametrize("init", INITS)
def test_deterministic_under_seed_and_global_rng_untouched(init):
    def state(seed):
        model = _inject("gpt2", init, seed=seed, check_rng=True)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    a, b = state(7), state(7)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs between two runs with the same seed"
