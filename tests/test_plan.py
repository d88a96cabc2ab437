"""``lowrank.plan``: the data-free first stop of ``inject`` (every check before any batch is drawn, nothing
changed, one frozen record per layer) and the declared ``Initializer.offset`` it relies on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lowrank
from lowrank import LoRAConfig
from lowrank.plan import Plan, plan
from tests.conftest import Snapshot, batches, tiny_bert, tiny_gpt2, tiny_llama


class _Untouchable:
    """Data that fails the test if a single batch is drawn."""

    def __iter__(self):
        raise AssertionError("the data was iterated: a check ran after the data pass started")


def test_tied_weights_are_refused_before_the_data_pass_for_a_declared_offset_init():
    model = tiny_gpt2()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'transformer.wte.weight'"):
        lowrank.inject(model, LoRAConfig(rank=4, targets=["lm_head"], init="lora_ga", scaling="rslora",
                                         init_options={"progress": False}), data=_Untouchable(), progress=False)
    snap.assert_unchanged()


def test_every_data_free_error_comes_before_the_data_pass():
    cases = [({"targets": ["nothing_like_this"]}, "matched no module"),
             ({"targets": ["query"], "rank": 100}, "rank 100 exceeds"),
             ({"targets": ["query"], "trainable": ["bert.encoder"]}, "contains the LoRA target"),
             ({"targets": ["query"], "init": "eva", "rank_budget": 1}, "smaller than 2 target layers"),
             ({"targets": ["query"], "init_options": {"progress": False, "estimator": "sketch", "sketch_size": 2}},
              "sketch_size=2 is smaller than the 4 singular triplets")]
    for cfg, match in cases:
        model = tiny_bert()
        with pytest.raises(ValueError, match=match):
            lowrank.inject(model, LoRAConfig(**{"rank": 2, "init": "lora_ga", "scaling": "rslora",
                                                "init_options": {"progress": False}, **cfg}),
                           data=_Untouchable(), progress=False)


def test_plan_changes_nothing_and_holds_one_frozen_record_per_layer():
    model = tiny_bert()
    snap = Snapshot(model)
    cfg = LoRAConfig(rank=2, alpha=4, targets=["query", "value"], init="pissa", rank_pattern={"value": 3})
    p = plan(model, cfg)
    snap.assert_unchanged()
    assert isinstance(p, Plan) and not list(lowrank.adapted_layers(model))
    assert [s.name for s in p.layers] == [n for n, _ in model.named_modules() if n.endswith(("query", "value"))]
    assert {s.rank for s in p.layers if s.name.endswith("value")} == {3}
    assert all(s.scaling == cfg.scaling_for(s.name, s.rank) for s in p.layers)
    assert p.initializer.registry_name == "pissa" and p.initializer.offset is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.layers[0].rank = 5  # type: ignore[misc]
    lowrank.plan.commit(p, lowrank.init.driver.run_initializer(p.initializer, p.layers, seed=cfg.seed))
    assert len(list(lowrank.adapted_layers(model))) == len(p.layers)


def test_a_result_that_contradicts_the_declared_offset_is_an_error():
    @lowrank.register_initializer("test_says_no_offset")
    class Liar(lowrank.Initializer):
        """Declares no offset, returns one."""

        offset = False

        def init_layer(self, ctx):
            return lowrank.InitResult(A=ctx.randn(ctx.rank, ctx.n), B=ctx.randn(ctx.m, ctx.rank), offset=True)

    try:
        model = tiny_bert()
        snap = Snapshot(model)
        with pytest.raises(ValueError, match="declares offset=False but returned offset=True"):
            lowrank.inject(model, LoRAConfig(rank=2, targets=["query"], init="test_says_no_offset"), progress=False)
        snap.assert_unchanged()
    finally:
        lowrank.registry.INITIALIZERS.unregister("test_says_no_offset")


@pytest.mark.parametrize("name", lowrank.list_initializers())
def test_declared_offsets_match_what_each_builtin_returns(name):
    """The declaration the early tie check trusts, per registered initializer (``None``: decided per layer)."""
    cls = lowrank.get_initializer(name)
    kinds = cls.adapter_kinds
    adapter = next(a for a in ["lora", *lowrank.list_adapters()] if lowrank.get_adapter(a).kind in kinds)
    cfg = LoRAConfig(rank=2, targets=["query"], init=name, adapter=adapter, scaling="rslora",
                     init_options={"progress": False} if cls.uses_data else {})
    model = tiny_bert()
    p = plan(model, cfg)
    results = lowrank.init.driver.run_initializer(p.initializer, p.layers, seed=0, model=model,
                                                  data=batches("bert", 2) if cls.uses_data else None)
    if p.initializer.offset is not None:
        assert all(bool(r.offset) == p.initializer.offset for r in results)
    assert lowrank.registry.INITIALIZERS.entry(name).capabilities["offset"] == cls.offset


def test_one_initializer_instance_per_inject_call_and_its_warnings_each_call():
    """The config builds no instance it keeps: each ``inject`` builds exactly one (allocation, checks and init all
    use it), so per-call state such as LoRA-GA's scaling warning is fresh every call."""
    built = []
    base = lowrank.get_initializer("eva")

    @lowrank.register_initializer("test_counted_eva", override=True)
    class Counted(base):
        def __init__(self, **kw):
            built.append(1)
            super().__init__(**kw)

    try:
        cfg = LoRAConfig(rank=2, targets=["query", "value"], init="test_counted_eva", rank_budget=6,
                         init_options={"progress": False})
        assert not hasattr(cfg, "_initializer")
        for _ in range(2):
            built.clear()
            model = lowrank.inject(tiny_bert(), cfg, data=batches("bert"), progress=False)
            assert len(built) == 1
            ranks = {n: layer.rank for n, layer in lowrank.adapted_layers(model)}
            assert sum(ranks.values()) == 6
    finally:
        lowrank.registry.INITIALIZERS.unregister("test_counted_eva")
    ga = LoRAConfig(rank=2, targets=["query"], init="lora_ga", init_options={"progress": False})
    for _ in range(2):  # standard scaling: the paper's rsLoRA warning comes once per call, not once per config
        with pytest.warns(UserWarning, match="rsLoRA scaling"):
            lowrank.inject(tiny_bert(), ga, data=batches("bert"), progress=False)


def test_auto_rollback_is_exact_for_small_models_and_in_place_beyond_the_threshold(monkeypatch):
    import lowrank.plan as plan_mod

    cfg = LoRAConfig(rank=2, targets=["q_proj", "v_proj"], init="pissa")
    assert plan_mod.plan(tiny_llama(), cfg).rollback == "exact"  # a few KiB of copies
    monkeypatch.setattr(plan_mod, "EXACT_ROLLBACK_MAX_BYTES", 1000)  # below one 32x32 float32 weight (4096 B)
    assert plan_mod.plan(tiny_llama(), cfg).rollback == "recompute"
    assert plan_mod.plan(tiny_llama(), LoRAConfig(rank=2, targets=["q_proj"], init="kaiming")).rollback == "exact"
    assert plan_mod.plan(tiny_llama(), cfg, rollback="exact").rollback == "exact"  # asked for: kept
    model = tiny_llama()
    lowrank.inject(model, cfg, progress=False)  # the in-place path end to end: the output is kept
    x = torch.arange(7)[None]
    torch.testing.assert_close(model(x).logits, tiny_llama()(x).logits, rtol=1e-4, atol=1e-5)
