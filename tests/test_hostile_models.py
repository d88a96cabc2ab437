"""Threat: models and configs that make inject silently wrong (issue "Nothing silent, round two", items 2, 6, 8,
10, 11). Each test reproduces one hole; every refusal leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from tests.conftest import Snapshot, batches, tiny_bert, tiny_llama


class Aliased(nn.Module):
    """One Linear reachable under two names (``self.a = self.b = layer``), used twice in forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = self.b = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("target", ["a", "b"])
def test_the_same_module_under_two_names_is_refused_naming_both(target):
    model = Aliased()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"module 'a' is also reachable as \['b'\] .* would leave the other use"):
        lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=[target]))
    snap.assert_unchanged()
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["out"]))  # the other layers are fine


def test_trainable_that_contains_a_target_is_refused_naming_both():
    model = tiny_bert()
    snap = Snapshot(model)
    cfg = lowrank.LoRAConfig(rank=2, targets=["query"], trainable=["bert.encoder"], init="pissa")
    with pytest.raises(ValueError, match=r"trainable module 'bert.encoder' contains the LoRA target "
                                         r"'bert.encoder.layer.0.attention.self.query'"):
        lowrank.inject(model, cfg)
    snap.assert_unchanged()
    lowrank.inject(model, cfg.replace(trainable=["classifier"]))
    for _, layer in lowrank.adapted_layers(model):  # the offset base stays frozen
        assert not layer.base_layer.weight.requires_grad


def test_compiled_and_data_parallel_models_are_refused_and_their_saves_load_into_the_plain_model(tmp_path):
    model = tiny_bert()
    for wrapped, what in ((torch.compile(model), "torch.compile"), (nn.DataParallel(model), "DataParallel")):
        snap = Snapshot(model)
        with pytest.raises(TypeError, match=f"inject into the model before wrapping it in {what}"):
            lowrank.inject(wrapped, lowrank.LoRAConfig(rank=2, targets=["query"]))
        snap.assert_unchanged()
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["query"], init="gaussian", init_options={"b_std": 0.1}))
    x = batches("bert", 1)[0]
    with torch.no_grad():
        want = model.eval()(**x).logits
    for i, wrapped in enumerate((torch.compile(model), nn.DataParallel(model))):
        lowrank.save_adapter(wrapped, tmp_path / str(i))  # names without _orig_mod. / module.
        fresh = lowrank.load_adapter(tiny_bert(), tmp_path / str(i))
        with torch.no_grad():
            assert torch.equal(fresh.eval()(**x).logits, want)
        plain = tiny_bert()
        lowrank.load_adapter(nn.DataParallel(plain), tmp_path / str(i))  # into the wrapped model's own names
        with torch.no_grad():
            assert torch.equal(plain.eval()(**x).logits, want)
        lowrank.peft.export(wrapped, tmp_path / f"peft{i}")


def test_a_meta_device_model_gets_the_layer_and_the_fix():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' is on the meta device .* "
                                         "materialize the model first"):
        lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["q_proj"]))


def test_the_tied_weight_refusal_does_not_offer_an_offsetting_gaussian():
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2()
    model.transformer.h[0].mlp.c_fc.weight = model.transformer.h[1].mlp.c_fc.weight  # tie two layers
    with pytest.raises(ValueError, match=r"without offset \(kaiming, gaussian with b_std=0, lora_one, eva\)"):
        lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["c_fc"], init="gaussian", init_options={"b_std": 0.1}))


def test_peft_style_arguments_get_the_lowrank_names():
    with pytest.raises(TypeError, match=r"'r' \(did you mean rank\?\), 'target_modules' \(did you mean targets\?\)"):
        lowrank.LoRAConfig(r=8, target_modules=["q_proj"])
    with pytest.raises(TypeError, match=r"'ranks' \(did you mean rank\?\)"):
        lowrank.LoRAConfig(targets=["q"], ranks=4)


def test_initializer_and_adapter_names_match_case_insensitively():
    cfg = lowrank.LoRAConfig(rank=2, targets=["query"], init="PiSSA", adapter="LoRA")
    assert (cfg.init, cfg.adapter) == ("pissa", "lora")  # stored as registered
    assert lowrank.get_initializer("LoRA_GA") is lowrank.get_initializer("lora_ga")
    with pytest.raises(KeyError, match="did you mean 'lora_ga'"):
        lowrank.get_initializer("lora-ga")  # only case folds, not punctuation


@pytest.mark.parametrize("args,message", [
    ((torch.randn(2, 5), torch.randn(4, 2), 1.0, torch.randn(4, 6)), r"G is \(4, 6\) but B A is \(4, 5\)"),
    ((torch.randn(2, 5), torch.randn(4, 3), 1.0, torch.randn(4, 5)), "must share a rank"),
    ((torch.randn(0, 5), torch.randn(4, 0), 1.0, torch.randn(4, 5)), "must share a rank r >= 1"),
    ((torch.randn(5), torch.randn(4, 2), 1.0, torch.randn(4, 5)), "A must be a 2-D tensor, got a 1-D tensor"),
    ((torch.randn(2, 5), torch.randn(4, 2), -1.0, torch.randn(4, 5)), "scaling must be a positive finite"),
    ((torch.randn(2, 5), torch.randn(4, 2), 1.0, torch.full((4, 5), float("nan"))), "G has non-finite entries"),
])
def test_alignment_validates_its_inputs(args, message):
    from lowrank.theory import alignment

    with pytest.raises(ValueError, match=message):
        alignment(*args)
