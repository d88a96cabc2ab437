"""The contract every registered adapter passes (a newly registered one is covered automatically): inject,
identity at init where the initializer promises it, a training step moves only the declared parameters,
merge/unmerge/unload, save/load bitwise onto the original model, PEFT export where PEFT has the adapter
(a clear refusal otherwise), and bad input that leaves the model unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from lowrank.io import AdapterFileError
from lowrank.peft.format import peft_format

from .conftest import MODELS, Snapshot, batches

ADAPTERS = lowrank.list_adapters()
PEFT_ADAPTERS = {"lora", "dora"} | {a for a in ADAPTERS if peft_format(lowrank.get_adapter(a)) is not None}


def default_init(adapter: str) -> tuple[str, dict]:
    """An offset-free-or-offset init that exercises the adapter (non-zero update after one step)."""
    kind = lowrank.get_adapter(adapter).kind
    if kind == "factors":
        return "gaussian", {"b_std": 0.05}
    return ("lora_xs", {}) if kind == "latent" else (lowrank.list_initializers(adapter_kind=kind)[0], {})


def build(adapter: str, kind: str = "gpt2"):
    factory, targets, trainable, _ = MODELS[kind]
    init, opts = default_init(adapter)
    cfg = lowrank.LoRAConfig(rank=2, alpha=4, scaling="rslora", targets=targets, trainable=trainable, init=init,
                             init_options=opts, adapter=adapter, seed=1)
    return factory, cfg


def logits(model, kind="gpt2", seed=5):
    b = batches(kind, 1, seed=seed)[0]
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


def step(model, kind="gpt2"):
    opt = torch.optim.SGD(lowrank.trainable_parameters(model).values(), lr=0.5)
    opt.zero_grad()
    model(**batches(kind, 1, seed=2)[0]).loss.backward()
    opt.step()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_inject_identity_train_merge_unload(adapter):
    factory, cfg = build(adapter)
    base = factory()
    y0 = logits(base)
    model = lowrank.inject(factory(), cfg, progress=False)
    assert all(layer.registry_name == adapter for _, layer in lowrank.adapted_layers(model))
    if cfg.make_initializer().preserves_output:
        torch.testing.assert_close(logits(model), y0, rtol=1e-5, atol=1e-5)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    declared = {id(p) for _, layer in lowrank.adapted_layers(model) for p in layer.adapter_parameters().values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == declared  # gpt2 has no head here
    step(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(layer.delta_weight().abs().sum() > 0 for _, layer in lowrank.adapted_layers(model))
    y = logits(model)
    lowrank.merge(model)
    if all(layer.merge_exact for _, layer in lowrank.adapted_layers(model)):  # ResLoRA's shortcuts: approximated
        torch.testing.assert_close(logits(model), y, rtol=1e-4, atol=1e-5)
    lowrank.unmerge(model)
    torch.testing.assert_close(logits(model), y, rtol=1e-4, atol=1e-5)
    merged = lowrank.unload(lowrank.inject(factory(), cfg, progress=False), merge=False)
    torch.testing.assert_close(logits(merged), y0, rtol=1e-5, atol=1e-5)  # the original weights come back
    assert not list(lowrank.adapted_layers(merged))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_save_load_bitwise_and_wrong_adapter_refused(adapter, tmp_path):
    factory, cfg = build(adapter)
    model = lowrank.inject(factory(), cfg, progress=False)
    step(model)
    lowrank.save_adapter(model, tmp_path)
    fresh = lowrank.load_adapter(factory(), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    # a temporary requires_grad_(False) (before evaluating, a chain's link) is not what a file records
    first = next(iter(next(iter(lowrank.adapted_layers(model)))[1].adapter_parameters()))
    for _, layer in lowrank.adapted_layers(model):
        layer.adapter_parameters()[first].requires_grad_(False)
    lowrank.save_adapter(model, tmp_path / "frozen")

    def flags(m):
        return {(n, k): q.requires_grad for n, layer in lowrank.adapted_layers(m)
                for k, q in layer.adapter_parameters().items()}

    want = flags(lowrank.inject(factory(), cfg, progress=False))  # as injected: the initializer's own choice
    assert flags(lowrank.load_adapter(factory(), tmp_path / "frozen")) == want != flags(model)
    other = next(a for a in ADAPTERS if a != adapter and lowrank.get_adapter(a).kind == lowrank.get_adapter(adapter).kind) \
        if sum(lowrank.get_adapter(a).kind == lowrank.get_adapter(adapter).kind for a in ADAPTERS) > 1 else None
    if other is not None:  # e.g. a DoRA file onto a model injected with plain LoRA
        _, other_cfg = build(other)
        wrong = lowrank.inject(factory(), other_cfg, progress=False)
        snap = Snapshot(wrong)
        with pytest.raises(AdapterFileError, match=f"holds a '{adapter}' adapter, the model has a '{other}'"):
            lowrank.load_adapter(wrong, tmp_path)
        snap.assert_unchanged()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_peft_export_where_peft_has_the_adapter(adapter, tmp_path):
    peft = pytest.importorskip("peft")
    factory, cfg = build(adapter)
    model = lowrank.inject(factory(), cfg, progress=False)
    step(model)
    if adapter not in PEFT_ADAPTERS:
        with pytest.raises(ValueError, match=f"adapter '{adapter}' cannot be exported to PEFT"):
            lowrank.peft.export(model, tmp_path)
        assert not any(tmp_path.iterdir())
        return
    lowrank.peft.export(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    y, want = logits(pm), logits(model)
    assert ((y - want).abs().max() / want.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_bad_input_leaves_the_model_unchanged(adapter):
    factory, cfg = build(adapter)
    model = factory()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="exceeds min"):
        lowrank.inject(model, cfg.replace(rank=500), progress=False)
    with pytest.raises(ValueError, match="matched no module"):
        lowrank.inject(model, cfg.replace(targets=["nothing_here"]), progress=False)
    snap.assert_unchanged()
    kind = lowrank.get_adapter(adapter).kind
    wrong_init = next(n for n in lowrank.list_initializers() if kind not in lowrank.get_initializer(n).adapter_kinds)
    with pytest.raises(ValueError, match=f"initializer '{wrong_init}' does not support adapter '{adapter}'"):
        cfg.replace(init=wrong_init, init_options={})


def test_adapter_options_reach_the_layer_are_checked_and_round_trip(tmp_path):
    """``LoRAConfig.adapter_options`` is checked against the adapter's ``Options`` (as ``init_options`` are), given
    to every layer, and saved with the adapter so a load rebuilds the same layers."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Opts:
        gain: float = 1.0

        def __post_init__(self):
            if self.gain <= 0:
                raise ValueError(f"gain must be > 0, got {self.gain}")

    @lowrank.register_adapter("test_gained_lora", override=True)
    class Gained(lowrank.LoRALayer):
        Options = Opts

        def forward(self, x):
            y = self.base_layer(x)
            return y + self.options.gain * (super().forward(x) - y)

        def delta_weight(self, dtype=None):
            return self.options.gain * super().delta_weight(dtype)

    try:
        for bad, match in (({"gian": 2.0}, r"unknown option\(s\) \['gian'\] for adapter 'test_gained_lora'; valid "
                                           r"options: \['gain'\]"),
                           ({"gain": "2"}, "option gain='2' of adapter 'test_gained_lora' must be a finite number"),
                           ({"gain": -1.0}, "adapter 'test_gained_lora': gain must be > 0")):
            with pytest.raises(ValueError, match=match):
                lowrank.LoRAConfig(rank=2, targets=["c_attn"], adapter="test_gained_lora", adapter_options=bad)
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['gain'\] for adapter 'lora'; valid options: none"):
            lowrank.LoRAConfig(rank=2, targets=["c_attn"], adapter_options={"gain": 2.0})
        factory, cfg = build("test_gained_lora")
        cfg = cfg.replace(adapter_options={"gain": 3.0})
        model = lowrank.inject(factory(), cfg, progress=False)
        layers = dict(lowrank.adapted_layers(model))
        assert layers and all(layer.options == Opts(3.0) for layer in layers.values())
        step(model)
        lowrank.save_adapter(model, tmp_path / "a")
        loaded = lowrank.load_adapter(factory(), tmp_path / "a")
        assert all(layer.options == Opts(3.0) for _, layer in lowrank.adapted_layers(loaded))
        assert torch.equal(logits(loaded), logits(model))
        ref = lowrank.inject(factory(), cfg.replace(adapter_options={}), progress=False)
        for (_, a), (_, b) in zip(lowrank.adapted_layers(model), lowrank.adapted_layers(ref)):
            b.load_tensors(a.tensors())
        assert not torch.allclose(logits(ref), logits(model))  # gain 3 vs 1: the option acts
    finally:
        lowrank.registry.ADAPTERS.unregister("test_gained_lora")
