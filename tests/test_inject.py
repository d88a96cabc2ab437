"""inject / merge / unmerge / unload on tiny transformers models; bad input leaves the model unchanged."""

from __future__ import annotations

import pytest
import torch
import lowrank
from lowrank import LoRAConfig
from lowrank.weights import weight_view

from .conftest import Snapshot, batches, tiny_bert, tiny_gpt2


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lowrank.adapted_layers(model):
            layer.A.copy_(torch.randn(layer.A.shape, generator=g) * 0.1)
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.1)


def _out(model, batch):
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out.logits


def test_inject_wraps_freezes_and_preserves_output(tiny):
    kind, model, targets, trainable = tiny
    batch = batches(kind, 1)[0]
    y0 = _out(model, batch)
    expected = sorted(n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    n_params = sum(p.numel() for p in model.parameters())
    lowrank.inject(model, LoRAConfig(rank=4, alpha=8, targets=targets, trainable=trainable))
    layers = dict(lowrank.adapted_layers(model))
    assert sorted(layers) == expected and len(expected) >= 2 * len(targets)
    for name, layer in layers.items():
        assert layer.A.shape == (4, layer.d_in) and layer.B.shape == (layer.d_out, 4)
        assert layer.base_weight().shape == (layer.d_out, layer.d_in)
        assert layer.scaling == 2.0 and not layer.base_layer.weight.requires_grad
    names = set(lowrank.trainable_parameters(model))
    want = {f"{n}.{k}" for n in layers for k in ("A", "B")}
    want |= {n for n, _ in model.named_parameters() if any(n.startswith(t + ".") for t in trainable)}
    assert names == want
    assert sum(p.numel() for p in model.parameters()) == n_params + sum(
        layer.A.numel() + layer.B.numel() for layer in layers.values())
    assert torch.equal(_out(model, batch), y0)
    kind_name = "Conv1D" if kind == "gpt2" else "Linear"
    assert f"{len(layers)} x {kind_name}" in lowrank.summary(model)


def test_gpt2_conv1d_layout():
    model = tiny_gpt2()
    lowrank.inject(model, LoRAConfig(rank=2, targets=["c_attn"]))
    _, layer = next(lowrank.adapted_layers(model))
    assert (layer.d_out, layer.d_in) == (96, 32)  # c_attn: 32 -> 3 * 32
    assert layer.base_weight().shape == (96, 32) and layer.base_layer.weight.shape == (32, 96)


def test_summary_line():
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(rank=2, targets=["query"], trainable=["classifier"]))
    line = lowrank.summary(model)
    assert "\n" not in line
    assert "2 x Linear (256)" in line  # 2 layers x (2*32 + 32*2)
    assert "other trainable: 99" in line  # classifier 32*3 + 3


def test_merge_unmerge_unload(tiny):
    kind, model, targets, trainable = tiny
    batch = batches(kind, 1)[0]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lowrank.inject(model, LoRAConfig(rank=3, alpha=6, targets=targets))
    _randomize_adapters(model)
    y = _out(model, batch)
    lowrank.merge(model)
    torch.testing.assert_close(_out(model, batch), y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        lowrank.merge(model)
    lowrank.unmerge(model)
    torch.testing.assert_close(_out(model, batch), y, rtol=1e-4, atol=1e-5)
    merged = {n: (layer.base_weight() + layer.delta_weight()).detach() for n, layer in lowrank.adapted_layers(model)}
    lowrank.unload(model, merge=True)
    assert not list(lowrank.adapted_layers(model))
    for n, want in merged.items():
        torch.testing.assert_close(weight_view(model.get_submodule(n)), want)
    torch.testing.assert_close(_out(model, batch), y, rtol=1e-4, atol=1e-5)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "_lowrank_record")


def test_unload_without_merge_restores_original_bitwise():
    model = tiny_bert()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lowrank.inject(model, LoRAConfig(rank=3, targets=["query", "value"]))
    _randomize_adapters(model)
    lowrank.unload(model, merge=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
    lowrank.inject(model, LoRAConfig(rank=3, targets=["query"]))  # injectable again


def test_determinism_and_global_rng_untouched():
    def adapters(seed):
        model = tiny_bert()
        state = torch.get_rng_state()
        lowrank.inject(model, LoRAConfig(rank=4, targets=["query", "value"], seed=seed))
        assert torch.equal(torch.get_rng_state(), state)
        return {n: (layer.A.detach().clone(), layer.B.detach().clone()) for n, layer in lowrank.adapted_layers(model)}

    a, b, c = adapters(1), adapters(1), adapters(2)
    assert all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    assert not torch.equal(a[next(iter(a))][0], c[next(iter(c))][0])
    firsts = [v[0] for v in a.values()]
    assert not torch.equal(firsts[0], firsts[1])  # layers get different draws


# -- bad input: clear error, model unchanged ------------------------------------------------------
@pytest.mark.parametrize("cfg_kwargs,exc,match", [
    ({"targets": ["nope"]}, ValueError, r"matched no module.*Adaptable modules include: \['bert.encoder.layer.0"),
    ({"targets": ["attention"]}, TypeError, r"matched 'bert.encoder.layer.0.attention', a BertAttention"),
    ({"targets": ["word_embeddings"]}, TypeError, "a Embedding"),
    ({"targets": ["query"], "rank": 40}, ValueError, r"rank 40 exceeds .* = 32 for layer 'bert.encoder.layer.0.attention.self.query'; use rank <= 32"),
    ({"targets": ["query"], "rank_pattern": {r"layer\.1\..*": 33}}, ValueError, "rank 33 exceeds .* layer 'bert.encoder.layer.1"),
    ({"targets": ["query"], "trainable": ["head"]}, ValueError, "trainable module 'head' matches nothing"),
    ({"targets": ["query", "classifier"], "rank": 2, "trainable": ["classifier"]}, ValueError, "both a LoRA target and in trainable"),
])
def test_bad_targets_leave_model_unchanged(cfg_kwargs, exc, match):
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(exc, match=match):
        lowrank.inject(model, LoRAConfig(**cfg_kwargs))
    snap.assert_unchanged()


def test_inject_twice_is_an_error_and_changes_nothing():
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(rank=2, targets=["query"]))
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="already has lowrank adapters; call lowrank.unload"):
        lowrank.inject(model, LoRAConfig(rank=2, targets=["value"]))
    snap.assert_unchanged()


def test_failure_during_commit_rolls_back(monkeypatch):
    """An error after some layers were swapped and offset: modules, weights and flags all come back."""
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a non-default flag to preserve
    snap = Snapshot(model)
    calls = []
    original = lowrank.adapters.lora.apply_offset

    def flaky(layer):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated out of memory")
        return original(layer)

    monkeypatch.setattr(lowrank.adapters.lora, "apply_offset", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        lowrank.inject(model, LoRAConfig(rank=2, targets=["query", "value"], init="test_offset_init"))
    snap.assert_unchanged()


def test_failing_initializer_leaves_model_unchanged():
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="returned A of shape .* for layer 'bert.encoder.layer.0.attention.self.query'"):
        lowrank.inject(model, LoRAConfig(rank=2, targets=["query"], init="test_bad_shape_init"))
    snap.assert_unchanged()


def test_data_for_a_data_free_init_warns():
    model = tiny_bert()
    with pytest.warns(UserWarning, match="does not use data"):
        lowrank.inject(model, LoRAConfig(rank=2, targets=["query"]), data=batches("bert", 1))


def test_ops_on_a_plain_model_are_clear_errors():
    model = tiny_bert()
    for op in (lowrank.merge, lowrank.unmerge, lowrank.unload, lambda m: lowrank.save_adapter(m, "x")):
        with pytest.raises(ValueError, match="no lowrank adapters; call lowrank.inject"):
            op(model)


@pytest.fixture(autouse=True, scope="module")
def _test_initializers():
    @lowrank.register_initializer("test_offset_init")
    class OffsetInit(lowrank.Initializer):
        """Non-zero A and B with offset."""

        def init_layer(self, ctx):
            return lowrank.InitResult(A=ctx.randn(ctx.rank, ctx.n), B=ctx.randn(ctx.m, ctx.rank), offset=True)

    @lowrank.register_initializer("test_bad_shape_init")
    class BadShape(lowrank.Initializer):
        """Returns a transposed A."""

        def init_layer(self, ctx):
            return lowrank.InitResult(A=ctx.zeros(ctx.n, ctx.rank), B=ctx.zeros(ctx.m, ctx.rank))

    yield
    for name in ("test_offset_init", "test_bad_shape_init"):
        lowrank.registry.INITIALIZERS.unregister(name)


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_rollback_recompute_writes_in_place_and_equals_exact(adapter):
    """rollback="recompute": the same model bit for bit, the base weights overwritten in their own storage."""
    exact = lowrank.inject(tiny_bert(), LoRAConfig(rank=2, targets=["query", "value"], init="pissa", adapter=adapter))
    model = tiny_bert()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    lowrank.inject(model, LoRAConfig(rank=2, targets=["query", "value"], init="pissa", adapter=adapter),
                   rollback="recompute")
    a, b = dict(exact.named_parameters()), dict(model.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    for n, p in model.named_parameters():
        if n.endswith("base_layer.weight"):
            assert p.data_ptr() == ptrs[n.replace(".base_layer", "")], n  # no new tensor: no extra copy


def test_rollback_recompute_checks_every_offset_before_writing():
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(FloatingPointError, match="offset base weight W0 - s B A is not finite.*model was not changed"):
        lowrank.inject(model, LoRAConfig(rank=2, targets=["query", "value"], init="gaussian",
                                         init_options={"std": 1e30, "b_std": 1e30}), rollback="recompute")
    snap.assert_unchanged()
    with pytest.raises(ValueError, match="invalid rollback='fast'"):
        lowrank.inject(model, LoRAConfig(rank=2, targets=["query"]), rollback="fast")
    snap.assert_unchanged()


def test_rollback_recompute_restores_within_rounding_after_an_interrupt(monkeypatch):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_modules()]
    calls = []
    original = lowrank.adapters.lora.apply_offset

    def flaky(layer):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(layer)

    monkeypatch.setattr(lowrank.adapters.lora, "apply_offset", flaky)
    with pytest.raises(KeyboardInterrupt):
        lowrank.inject(model, LoRAConfig(rank=2, targets=["query", "value"], init="pissa"), rollback="recompute")
    assert [n for n, _ in model.named_modules()] == names
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offsets_are_computed_in_row_blocks_equal_to_the_fused_product(monkeypatch, dtype):
    """``offset_value`` works block by block (no ``(m, n)`` temporary in place): each block is the fused
    ``addmm`` of its rows, so the result equals one ``addmm`` over the whole weight to within one rounding of
    the weight's dtype, and the in-place write gives the same bits as the copy."""
    from lowrank import weights

    monkeypatch.setattr(weights, "OFFSET_BLOCK", 7 * 16)  # 7 rows of 16 per block: 24 rows -> 4 blocks
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, 24).to(dtype)
    A, B = torch.randn(3, 16, generator=g), torch.randn(24, 3, generator=g)
    w0 = layer.weight.detach().clone()
    full = torch.addmm(w0.float(), B, A, alpha=-0.5).to(dtype)
    new = weights.offset_value(layer, w0, A, B, 0.5)
    assert new.dtype == dtype and new.shape == (24, 16)
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(new.float(), full.float(), rtol=tol, atol=1e-6 if dtype == torch.float32 else 1e-2)
    ptr = layer.weight.data_ptr()
    with weights.offsets_in_place():
        assert weights.offset_weight(layer, layer.weight.detach(), A, B, 0.5) is None
    assert layer.weight.data_ptr() == ptr and torch.equal(layer.weight.detach(), new)


def test_an_offset_not_finite_in_its_last_block_is_caught_before_any_block_is_written(monkeypatch):
    from lowrank import weights

    monkeypatch.setattr(weights, "OFFSET_BLOCK", 4 * 8)  # 4 rows per block
    layer = torch.nn.Linear(8, 12)
    before = layer.weight.detach().clone()
    A, B = torch.ones(2, 8), torch.zeros(12, 2)
    B[-1] = float("inf")  # only the last block's rows are not finite
    with weights.offsets_in_place(), pytest.raises(FloatingPointError, match="not finite.*model was not changed"):
        weights.offset_weight(layer, layer.weight.detach(), A, B, 1.0)
    assert torch.equal(layer.weight.detach(), before)
    with pytest.raises(FloatingPointError, match="not finite"):
        weights.offset_weight(layer, layer.weight.detach(), A, B, 1.0)
    assert torch.equal(layer.weight.detach(), before)


@pytest.mark.parametrize("init", ["olora", "lora_xs", "pissa"])
def test_init_results_do_not_keep_whole_factorizations_alive(init):
    """``Q[:, :r]`` of a full QR (OLoRA) or ``U[:, :r]`` of a full SVD is a view of a weight-sized tensor: the
    driver copies such factors out, so the results of all layers held until the commit stay ``O((m + n) r)``."""
    from lowrank.init.driver import LayerSpec, run_initializer

    model = tiny_bert()
    specs = [LayerSpec(n, m, 2, 4.0, 2.0) for n, m in model.named_modules() if n.endswith(("query", "dense"))]
    results = run_initializer(lowrank.registry.INITIALIZERS.get(init)(), specs)
    for spec, res in zip(specs, results):
        for t in (res.A, res.B, *res.extras.values()):
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size(), spec.name
