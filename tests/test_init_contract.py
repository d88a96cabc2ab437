"""Contract tests run for every registered initializer x every registered adapter it supports (a newly
registered one of either is covered automatically).

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

PAIRS = [(adapter, init) for adapter in lowrank.list_adapters() for init in lowrank.list_initializers()
         if lowrank.get_adapter(adapter).kind in lowrank.get_initializer(init).adapter_kinds]
KINDS = ["bert", "gpt2", "llama"]


def test_every_adapter_and_initializer_has_a_partner():
    assert {a for a, _ in PAIRS} == set(lowrank.list_adapters())
    assert {i for _, i in PAIRS} == set(lowrank.list_initializers())


def _inject(kind, init, dtype=torch.float32, seed=0, check_rng=False, adapter="lora"):
    factory, targets, _, _ = MODELS[kind]
    model = factory(dtype=dtype)
    cls = lowrank.get_initializer(init)
    data = batches(kind, 2) if cls.uses_data else None
    cfg = LoRAConfig(rank=2, alpha=4, targets=targets, init=init, scaling="rslora", seed=seed, adapter=adapter)
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
@pytest.mark.parametrize("adapter,init", PAIRS)
def test_shapes_finite_and_output_preserved_float32(adapter, init, kind):
    factory = MODELS[kind][0]
    y0 = _logits(factory(), kind)
    model = _inject(kind, init, adapter=adapter)
    layers = dict(lowrank.adapted_layers(model))
    assert layers
    if model._lowrank_record.config.allocates_ranks:  # EVA (rho > 1), GoRA: ranks chosen under the budget
        assert sum(layer.rank for layer in layers.values()) == 2 * len(layers)
    for name, layer in layers.items():
        r = layer.rank if model._lowrank_record.config.allocates_ranks else 2
        assert layer.registry_name == adapter
        if isinstance(getattr(layer, "A", None), torch.Tensor):  # A (r, d_in), B (d_out, r) factors; RandLoRA has none
            assert layer.A.shape == (r, layer.d_in) and layer.B.shape == (layer.d_out, r), name
        info = {"rank": r, "d_in": layer.d_in, "d_out": layer.d_out, "offset": layer.offset}
        assert {k: tuple(t.shape) for k, t in layer.tensors().items()} == layer.tensor_shapes(info)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in layer.tensors().values())
        assert torch.isfinite(layer.base_weight()).all() and not layer.base_layer.weight.requires_grad
        frozen = lowrank.registry.INITIALIZERS.entry(init).capabilities["frozen"]  # MiCA's B
        params = {k: p for k, p in layer.adapter_parameters().items() if k not in frozen}
        assert params and all(p.requires_grad for p in params.values())
        trainable = {id(p) for p in layer.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in params.values()}, "only the adapter's declared, unfrozen parameters train"
    y1 = _logits(model, kind)
    if LoRAConfig(rank=2, targets=["x"], init=init, adapter=adapter).make_initializer().preserves_output:
        torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5 * y0.abs().max().item())


@pytest.mark.parametrize("adapter,init", PAIRS)
def test_bfloat16_output_preserved_within_rounding(adapter, init):
    kind = "bert"
    factory = MODELS[kind][0]
    y0 = _logits(factory(dtype=torch.bfloat16), kind)
    model = _inject(kind, init, dtype=torch.bfloat16, adapter=adapter)
    for _, layer in lowrank.adapted_layers(model):
        assert all(t.dtype == torch.bfloat16 for t in layer.tensors().values())
        assert layer.base_layer.weight.dtype == torch.bfloat16
    if LoRAConfig(rank=2, targets=["x"], init=init, adapter=adapter).make_initializer().preserves_output:
        # a few bfloat16 ulps (2^-8 relative) of the logits, accumulated over two layers
        torch.testing.assert_close(_logits(model, kind), y0, rtol=2 ** -5, atol=2 ** -5 * y0.abs().max().item())


@pytest.mark.parametrize("adapter,init", PAIRS)
def test_deterministic_under_seed_and_global_rng_untouched(adapter, init):
    def state(seed):
        model = _inject("gpt2", init, seed=seed, check_rng=True, adapter=adapter)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    a, b = state(7), state(7)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs between two runs with the same seed"
