"""PEFT interop with real peft (never mocks): export -> PeftModel.from_pretrained on the original
base, PEFT -> lowrank.peft.load, lowrank.peft.initialize on a PEFT model, and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import lowrank
from lowrank.io import AdapterFileError
from tests.conftest import MODELS, Snapshot, batches, tiny_bert

peft = pytest.importorskip("peft")

INITS = [i for i in lowrank.list_initializers() if "factors" in lowrank.get_initializer(i).adapter_kinds]  # PEFT LoRA


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def trained_lowrank(kind: str, init: str, scaling: str = "standard"):
    factory, targets, trainable, _ = MODELS[kind]
    data = batches(kind, 3, seed=1)
    uses_data = lowrank.get_initializer(init).uses_data
    options = {"progress": False} if uses_data else {}
    if init == "gaussian":
        options = {"b_std": 0.02}  # non-zero B: the offset path
    cfg = lowrank.LoRAConfig(rank=2, alpha=4, scaling=scaling, targets=targets, trainable=trainable, init=init,
                             init_options=options, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_ga under standard scaling says so
        model = lowrank.inject(factory(), cfg, data=data if uses_data else None, progress=False)
    opt = torch.optim.SGD(lowrank.trainable_parameters(model).values(), lr=0.05)
    model.train()
    for b in data:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    return model.eval(), factory


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_export_loads_in_peft_on_the_original_base(kind, init, scaling, tmp_path):
    model, factory = trained_lowrank(kind, init, scaling)
    lowrank.peft.export(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    b = batches(kind, 1, seed=7)[0]
    assert max_rel_diff(outputs(peft_model, b), outputs(model, b)) <= 1e-5
    back = lowrank.peft.load(factory(), tmp_path)  # and PEFT -> lowrank on the original base
    assert max_rel_diff(outputs(back, b), outputs(model, b)) <= 1e-5
    note = json.loads((tmp_path / "lowrank_export.json").read_text())
    assert note["init"] == init
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    offset = any(layer.offset for _, layer in lowrank.adapted_layers(model))
    layers = dict(lowrank.adapted_layers(model))
    if model._lowrank_record.config.allocates_ranks:  # EVA, GoRA: per-layer ranks and alphas as PEFT patterns
        from lowrank.peft.export import exact_key

        ranks = {exact_key(n): layer.rank * (2 if offset else 1) for n, layer in layers.items()}
        assert {k: cfg["rank_pattern"].get(k, cfg["r"]) for k in ranks} == ranks
        return
    assert cfg["r"] == (4 if offset else 2)  # the rank-2r conversion for offset inits
    want_alpha = 4 * (1 if not offset else (2 if scaling == "standard" else 2 ** 0.5))
    assert cfg["lora_alpha"] == pytest.approx(want_alpha)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_into_lowrank(kind, rslora, tmp_path):
    factory, targets, trainable, _ = MODELS[kind]
    torch.manual_seed(0)
    first = targets[0]
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_rslora=rslora, init_lora_weights=False,
                          rank_pattern={first: 3}, alpha_pattern={first: 5}, modules_to_save=trainable or None,
                          fan_in_fan_out=kind == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(factory(), cfg).eval()
    pm.save_pretrained(tmp_path)
    model = lowrank.peft.load(factory(), tmp_path)
    b = batches(kind, 1, seed=8)[0]
    assert max_rel_diff(outputs(model, b), outputs(pm, b)) <= 1e-5
    layers = dict(lowrank.adapted_layers(model))
    special = [n for n in layers if n.endswith(first)]
    assert special and all(layers[n].rank == 3 for n in special)
    # round trip back: lowrank -> PEFT reproduces the same outputs
    lowrank.peft.export(model, tmp_path / "again")
    back = peft.PeftModel.from_pretrained(factory(), tmp_path / "again").eval()
    assert max_rel_diff(outputs(back, b), outputs(pm, b)) <= 1e-5


def _reference_mean_gradient(model, names, data):
    for p in model.parameters():
        p.requires_grad_(False)
    mods = dict(model.named_modules())
    for n in names:
        mods[n].weight.requires_grad_(True)
    for b in data:
        model(**b).loss.backward()
    G = {n: mods[n].weight.grad.double() / len(data) for n in names}
    for n in names:
        mods[n].weight.grad = None
    return G


def test_initialize_peft_model_with_lora_ga_satisfies_the_theorem():
    data = batches("bert", 3, seed=2)
    ref = tiny_bert().eval()
    names = [n for n, m in ref.named_modules() if n.endswith(("query", "value"))]
    G = _reference_mean_gradient(ref, names, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                                                              target_modules=["query", "value"])).eval()
    before = outputs(pm, data[0])
    lowrank.peft.initialize(pm, "lora_ga", data=data, init_options={"progress": False})
    assert max_rel_diff(outputs(pm, data[0]), before) <= 1e-5  # output preserved (base offset)
    mods = dict(pm.base_model.model.named_modules())
    for n in names:
        layer = mods[n]
        A = layer.lora_A["default"].weight.detach().double().numpy()
        B = layer.lora_B["default"].weight.detach().double().numpy()
        s, m = layer.scaling["default"], B.shape[0]
        g = G[n].numpy()
        U, S, Vt = np.linalg.svd(g, full_matrices=False)
        g2r = (U[:, :4] * S[:4]) @ Vt[:4]
        zeta = s ** 2 * m ** 0.5 / 16
        np.testing.assert_allclose(s ** 2 * (B @ B.T @ g + g @ A.T @ A), zeta * g2r, rtol=1e-4,
                                   atol=1e-5 * zeta * S[0])


def test_initialize_peft_model_with_pissa_and_rollback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    W0 = layer.get_base_layer().weight.detach().double().clone()
    snap = Snapshot(pm)
    with pytest.raises(ValueError, match="data-driven"), pytest.warns(UserWarning, match="rsLoRA"):
        lowrank.peft.initialize(pm, "lora_ga")
    with pytest.raises(KeyError):
        lowrank.peft.initialize(pm, "lora-ga")
    snap.assert_unchanged()
    lowrank.peft.initialize(pm, "pissa")
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    W = layer.get_base_layer().weight.double()
    torch.testing.assert_close(W + layer.scaling["default"] * B @ A, W0, rtol=0, atol=1e-6)


class _Other(lowrank.LoRALayer):
    """A second adapter kind, to check export refuses what PEFT cannot represent."""


def test_export_refuses_other_adapter_kinds_and_merged(tmp_path):
    lowrank.register_adapter("other_kind_for_test")(_Other)
    try:
        model = lowrank.inject(tiny_bert(), lowrank.LoRAConfig(rank=2, targets=["query"], adapter="other_kind_for_test"))
        with pytest.raises(ValueError, match="'other_kind_for_test' cannot be exported"):
            lowrank.peft.export(model, tmp_path / "x")
    finally:
        from lowrank.registry import ADAPTERS
        ADAPTERS.unregister("other_kind_for_test")
    model = lowrank.inject(tiny_bert(), lowrank.LoRAConfig(rank=2, targets=["query"]))
    lowrank.merge(model)
    with pytest.raises(ValueError, match="merged"):
        lowrank.peft.export(model, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _saved_bert_adapter(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                              init_lora_weights=False))
    pm.save_pretrained(path)
    return path


def test_load_mismatch_and_corruption_leave_model_unchanged(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    src = _saved_bert_adapter(tmp_path / "a")
    # another architecture: the first adapter layer is not a module of it
    gpt2 = MODELS["gpt2"][0]()
    snap = Snapshot(gpt2)
    with pytest.raises(AdapterFileError, match="is not a module of GPT2LMHeadModel"):
        lowrank.peft.load(gpt2, src)
    snap.assert_unchanged()
    # same names, other width: shapes named
    wide = BertForSequenceClassification(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=97, num_labels=3))
    snap = Snapshot(wide)
    with pytest.raises(AdapterFileError, match=r"does not fit: lora_A \(2, 32\)"):
        lowrank.peft.load(wide, src)
    snap.assert_unchanged()
    # truncated weights, missing files, broken JSON, a partial DoRA adapter
    model = tiny_bert()
    snap = Snapshot(model)
    w = src / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="corrupted or truncated"):
        lowrank.peft.load(model, src)
    w.unlink()
    with pytest.raises(AdapterFileError, match="missing adapter_model.safetensors"):
        lowrank.peft.load(model, src)
    src2 = _saved_bert_adapter(tmp_path / "b")
    (src2 / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        lowrank.peft.load(model, src2)
    src3 = _saved_bert_adapter(tmp_path / "c")
    cfg = json.loads((src3 / "adapter_config.json").read_text())
    cfg["use_dora"] = True  # a DoRA config without magnitude vectors
    (src3 / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="lacks lora_magnitude_vector; the file is partial"):
        lowrank.peft.load(model, src3)
    snap.assert_unchanged()


@pytest.mark.slow
def test_minilm_lora_ga_round_trip_through_peft(tmp_path):
    from lowrank_ablation.data.batches import classification_batches
    from lowrank_ablation.data.minilm import load_minilm_classifier
    from lowrank_ablation.data.wordnet import supersense_splits

    train, _ = supersense_splits(n_train=64, n_eval=41)
    n = train.features["label"].num_classes
    torch.manual_seed(0)
    model, tok = load_minilm_classifier(n)
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    data = list(classification_batches(train, tok, 16, shuffle=True, seed=0))[:2]
    cfg = lowrank.LoRAConfig(rank=4, alpha=8, scaling="rslora", targets=["query", "value"], init="lora_ga",
                             trainable=["classifier"], init_options={"progress": False})
    lowrank.inject(model, cfg, data=data, progress=False)
    lowrank.peft.export(model, tmp_path)
    fresh, _ = load_minilm_classifier(n)
    fresh.classifier.load_state_dict(head)
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert max_rel_diff(outputs(pm, data[0]), outputs(model, data[0])) <= 1e-5


def test_initialize_rolls_back_a_failed_commit(monkeypatch):
    """A failure while writing the second layer's offset puts every weight back bit for bit."""
    import importlib

    mod = importlib.import_module("lowrank.peft.initialize")  # the module, not the function it exports

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    snap = Snapshot(pm)
    calls = []
    real = mod.offset_weight

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure")
        return real(*args)

    monkeypatch.setattr(mod, "offset_weight", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        lowrank.peft.initialize(pm, "pissa")
    snap.assert_unchanged()


def test_initialize_refuses_an_allocating_initializer_and_runs_eva_at_fixed_ranks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    snap = Snapshot(pm)
    with pytest.raises(ValueError, match="allocates per-layer ranks, but a PEFT model's LoRA layers are already built"):
        lowrank.peft.initialize(pm, "eva", data=batches("bert", 2), init_options={"progress": False})
    snap.assert_unchanged()
    lowrank.peft.initialize(pm, "eva", data=batches("bert", 2), init_options={"rho": 1, "progress": False})
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            A = mod.lora_A["default"].weight.detach()
            torch.testing.assert_close(A @ A.T, torch.eye(2), rtol=0, atol=1e-5)
            assert torch.equal(mod.lora_B["default"].weight, torch.zeros_like(mod.lora_B["default"].weight))
