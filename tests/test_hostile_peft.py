"""Threat: the PEFT paths lose or mislabel a trained adapter (issue "Nothing silent, round two", items 1 and 3).

- A PEFT model initialized by ``lowrank.peft.initialize`` with an offset init, then trained: ``save_pretrained``
  warns (its adapter is for the offset base), ``lowrank.peft.export`` writes the adapter for the original base
  (rank-2r conversion, ``modules_to_save`` kept) that ``PeftModel.from_pretrained`` loads with equal outputs.
- PEFT's names are matched as PEFT matches them: ``lowrank.peft.load`` adapts exactly the modules an adapter
  names, ``export``'s ``rank_pattern`` / ``alpha_pattern`` keys select exactly the layer meant.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from tests.conftest import Snapshot, batches, tiny_bert

peft = pytest.importorskip("peft")


def outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def trained_peft(init: str, rslora: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, use_rslora=rslora,
                                                              target_modules=["query", "value"],
                                                              modules_to_save=["classifier"]))
    opts = {"progress": False} if lowrank.get_initializer(init).uses_data else {}
    lowrank.peft.initialize(pm, init, data=batches("bert", 2) if opts else None, init_options=opts)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.2)
    pm.train()
    for b in batches("bert", 3, seed=5):
        loss = pm(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm


@pytest.mark.parametrize("init,rslora", [("lora_ga", True), ("pissa", False), ("olora", True), ("kaiming", False)])
def test_a_trained_peft_model_from_an_offset_init_exports_for_the_original_base(init, rslora, tmp_path):
    pm = trained_peft(init, rslora)
    probe = batches("bert", 1, seed=9)[0]
    want = outputs(pm, probe)
    lowrank.peft.export(pm, tmp_path / "exported")
    fresh = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "exported")  # the original base
    err = (outputs(fresh, probe) - want).abs().max().item()
    assert err <= 1e-5
    trained_head = pm.base_model.model.classifier.modules_to_save["default"].weight
    assert torch.equal(fresh.base_model.model.classifier.modules_to_save["default"].weight, trained_head)
    offset = init != "kaiming"
    if offset:
        assert lowrank.peft.native.records(pm)["default"].initial  # what export needed was recorded
        with pytest.warns(UserWarning, match="relative to the offset base .* use lowrank.peft.export"):
            pm.save_pretrained(tmp_path / "peft-native")
        wrong = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "peft-native")
        assert (outputs(wrong, probe) - want).abs().max().item() > 100 * max(err, 1e-7)  # the bug the warning names
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            pm.save_pretrained(tmp_path / "peft-native")  # nothing to warn about without an offset


def test_a_second_offset_initialize_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    lowrank.peft.initialize(pm, "pissa")
    snap = Snapshot(pm)
    with pytest.raises(ValueError, match="already initialized with 'pissa', which offset its base weights"):
        lowrank.peft.initialize(pm, "pissa")
    snap.assert_unchanged()


class TwoProj(torch.nn.Module):
    """A top-level ``proj`` and a ``head.proj``: a name list that matches by suffix confuses the two."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Module()
        self.head.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head.proj(torch.relu(self.proj(x)))


def _peft_layers(pm) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and "default" in m.lora_A}


def test_load_adapts_exactly_the_modules_the_peft_adapter_names(tmp_path):
    pm = peft.get_peft_model(TwoProj(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=r"proj",
                                                        init_lora_weights=False))  # regex: the top-level one only
    assert _peft_layers(pm) == {"proj"}
    pm.save_pretrained(tmp_path)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = pm(x)
    model = lowrank.peft.load(TwoProj(), tmp_path)
    assert {n for n, _ in lowrank.adapted_layers(model)} == {"proj"}  # not head.proj
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-6)


def test_export_patterns_select_exactly_the_layer_meant(tmp_path):
    cfg = lowrank.LoRAConfig(rank=2, alpha=4, targets=["proj"], rank_pattern={"head.proj": 4})
    model = lowrank.inject(TwoProj(), cfg, progress=False)
    for _, layer in lowrank.adapted_layers(model):  # as if trained: B != 0
        torch.nn.init.normal_(layer.B, std=0.5)
    assert dict((n, l.rank) for n, l in lowrank.adapted_layers(model)) == {"proj": 2, "head.proj": 4}
    lowrank.peft.export(model, tmp_path / "both")
    x = torch.randn(3, 8)
    pm = peft.PeftModel.from_pretrained(TwoProj(), tmp_path / "both")  # a suffix key would give head.proj rank 2
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-6)
    back = lowrank.peft.load(TwoProj(), tmp_path / "both")  # and back, per-layer ranks kept
    assert dict((n, l.rank) for n, l in lowrank.adapted_layers(back)) == {"proj": 2, "head.proj": 4}
    # only the top-level proj adapted: PEFT must not add a LoRA layer to head.proj
    only = lowrank.inject(TwoProj(), lowrank.LoRAConfig(rank=2, targets=r"^proj$"), progress=False)
    torch.nn.init.normal_(only.proj.B, std=0.5)
    lowrank.peft.export(only, tmp_path / "one")
    pm1 = peft.PeftModel.from_pretrained(TwoProj(), tmp_path / "one")
    assert _peft_layers(pm1) == {"proj"}
    with torch.no_grad():
        assert torch.allclose(pm1(x), only(x), atol=1e-6)


def test_rank_one_rslora_exports_with_the_rslora_alpha(tmp_path):
    """At r = 1, alpha / r == alpha / sqrt(r): the rule must be passed, not guessed from the numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=1, lora_alpha=2, use_rslora=True,
                                                              target_modules=["query"]))
    lowrank.peft.initialize(pm, "pissa")
    probe = batches("bert", 1, seed=9)[0]
    lowrank.peft.export(pm, tmp_path)
    fresh = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert (outputs(fresh, probe) - outputs(pm, probe)).abs().max().item() <= 1e-5
    model = lowrank.inject(tiny_bert(), lowrank.LoRAConfig(rank=1, alpha=2, scaling="rslora", targets=["query"],
                                                           init="pissa"))
    lowrank.peft.export(model, tmp_path / "lowrank")
    fresh = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "lowrank")
    assert (outputs(fresh, probe) - outputs(model, probe)).abs().max().item() <= 1e-5


def test_a_copy_warns_for_itself_and_peft_own_offset_inits_are_refused(tmp_path):
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    lowrank.peft.initialize(pm, "olora")
    twin = copy.deepcopy(pm)
    assert twin.save_pretrained.__self__ is twin  # bound to the copy, not to the original
    with pytest.warns(UserWarning, match="relative to the offset base"):
        twin.save_pretrained(tmp_path / "twin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"],
                                                               init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="initialized by PEFT itself \\(init_lora_weights='pissa'\\)"):
        lowrank.peft.export(own, tmp_path / "own")


class _Untouchable:
    def __iter__(self):
        raise AssertionError("the data was iterated: the tie check ran after the data pass started")


def test_initialize_refuses_an_offset_on_tied_weights_before_the_data_pass():
    """GPT-2's ``lm_head`` shares ``wte``: offsetting it would silently change the embeddings too."""
    from tests.conftest import tiny_gpt2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["lm_head"], use_rslora=True))
    snap = Snapshot(pm)
    for init, data in (("pissa", None), ("lora_ga", _Untouchable())):
        with pytest.raises(ValueError, match="lm_head.base_layer' shares its weight with .*wte.weight"):
            lowrank.peft.initialize(pm, init, data=data, init_options={"progress": False} if data else None)
        snap.assert_unchanged()
    wte = pm.base_model.model.transformer.wte.weight.detach().clone()
    lowrank.peft.initialize(pm, "kaiming")  # no offset: the tie is harmless
    assert torch.equal(pm.base_model.model.transformer.wte.weight, wte)
