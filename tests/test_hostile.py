"""Hostile and careless inputs.

Threat model:
- adapter files and sweep configs are untrusted input (people download adapters, edit configs by hand):
  a file may be truncated, edited, or crafted; it must never change a weight it does not declare, and a
  rejected file leaves the model and the files exactly as they were;
- models may have tied or shared weights (GPT-2's ``lm_head`` is ``wte``): lowrank never changes an
  untargeted weight;
- sweeps run for days: a bad value is an error before any training, a damaged results line is skipped
  and reported, and an optimizer never half-applies a step.

Every outcome is either success with a correct model, or a documented error (``AdapterFileError``,
``ValueError``, ``FloatingPointError``) naming the layer or field, with the model unchanged. Each numbered
test reproduces one hole found by probing (the sweep holes 6 and 7 live in ``tests/test_ablation.py`` and
``tests/test_ablation_search.py``); the last tests fuzz configs and adapter files with hypothesis.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lowrank
from lowrank import LoRAConfig
from lowrank.io import CONFIG_NAME, LOCK_NAME, WEIGHTS_NAME, AdapterFileError
from lowrank.optim import PreconditionedOptimizer

from .conftest import Snapshot, batches, tiny_bert, tiny_gpt2


def _rewrite(path, meta=None, tensors=None):
    """Write a crafted adapter whose checksum is right (an attacker can recompute it)."""
    meta = meta if meta is not None else json.loads((path / CONFIG_NAME).read_text())
    if tensors is not None:
        blob = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "lowrank-adapter"})
        (path / WEIGHTS_NAME).write_bytes(blob)
    meta["weights_sha256"] = hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def _files(path):
    return {f: (path / f).read_bytes() for f in (CONFIG_NAME, WEIGHTS_NAME)}


def _rejects(model, path, match, exc=AdapterFileError):
    snap, files = Snapshot(model), _files(path)
    with pytest.raises(exc, match=match):
        lowrank.load_adapter(model, path)
    snap.assert_unchanged()
    assert _files(path) == files


def _saved_bert(path, **cfg):
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(**{"rank": 2, "targets": ["query", "value"], **cfg}))
    with torch.no_grad():
        for _, layer in lowrank.adapted_layers(model):
            layer.B.normal_(0, 0.1)
    lowrank.save_adapter(model, path)
    return model


# 1 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "lora_ga"])
def test_01_offset_init_on_tied_weights_is_refused_and_nothing_changes(init):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'transformer.wte.weight' .*Untie first"):
        lowrank.inject(model, LoRAConfig(rank=4, targets=["lm_head"], init=init, scaling="rslora",
                                         init_options={"progress": False} if init == "lora_ga" else {}),
                       data=batches("gpt2", 2) if init == "lora_ga" else None, progress=False)
    snap.assert_unchanged()


def test_01_tied_weights_never_change_through_merge_or_load(tmp_path):
    model = tiny_gpt2()
    emb = model.transformer.wte.weight.detach().clone()
    lowrank.inject(model, LoRAConfig(rank=4, targets=["lm_head"]))  # no offset: allowed, outputs unchanged
    with torch.no_grad():
        model.lm_head.B.normal_()
    with pytest.raises(ValueError, match="cannot merge layer 'lm_head': its weight is tied"):
        lowrank.merge(model)
    with pytest.raises(ValueError, match="tied"):
        lowrank.unload(model, merge=True)
    assert torch.equal(model.transformer.wte.weight, emb)
    # an offset adapter saved from an untied copy cannot be loaded onto the tied model either
    untied = tiny_gpt2()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    lowrank.inject(untied, LoRAConfig(rank=4, targets=["lm_head"], init="pissa"))
    lowrank.save_adapter(untied, tmp_path)
    _rejects(tiny_gpt2(), tmp_path, "tied weights", exc=ValueError)


# 2 ----------------------------------------------------------------------------------------------
def test_02_undeclared_trainable_tensors_are_refused(tmp_path):
    _saved_bert(tmp_path)
    tensors = st_load((tmp_path / WEIGHTS_NAME).read_bytes())
    tensors["trainable.bert.embeddings.word_embeddings.weight"] = torch.zeros(97, 32)
    _rewrite(tmp_path, tensors=tensors)
    _rejects(tiny_bert(), tmp_path, "belongs to no module of the file's trainable list")
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["trainable"] = ["bert.embeddings.word_embeddings"]  # declared in the list but not by the config
    _rewrite(tmp_path, meta)
    _rejects(tiny_bert(), tmp_path, "is not named by the config's trainable")


def test_02_a_stray_layer_tensor_is_refused(tmp_path):
    _saved_bert(tmp_path)
    tensors = st_load((tmp_path / WEIGHTS_NAME).read_bytes())
    tensors["layers.bert.pooler.dense.A"] = torch.zeros(2, 32)
    _rewrite(tmp_path, tensors=tensors)
    _rejects(tiny_bert(), tmp_path, "unexpected tensor 'layers.bert.pooler.dense.A'")


# 3 ----------------------------------------------------------------------------------------------
def test_03_alpha_mismatch_with_an_injected_model_is_an_error_naming_both(tmp_path):
    _saved_bert(tmp_path, alpha=16)
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(rank=2, alpha=64, targets=["query", "value"]))
    _rejects(model, tmp_path, r"alpha 16 \(scaling 8\).*alpha 64 \(scaling 32\)")
    # into the original model the file's own config is used: the same outputs as the saved model
    fresh = lowrank.load_adapter(tiny_bert(), tmp_path)
    assert all(layer.alpha == 16 for _, layer in lowrank.adapted_layers(fresh))


# 4 ----------------------------------------------------------------------------------------------
def test_04_non_finite_head_gradient_is_caught_before_anything_moves():
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(rank=2, targets=["query"], trainable=["classifier"]))
    opt = PreconditionedOptimizer(model, lr=1e-2, weight_decay=0.1)
    model(**batches("bert", 1)[0]).loss.backward()
    model.classifier.weight.grad[0, 0] = math.nan
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="parameter 'classifier.weight'"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# 5 ----------------------------------------------------------------------------------------------
def test_05_optimizer_state_of_another_rank_is_refused_on_load():
    def trained(rank):
        model = tiny_bert()
        lowrank.inject(model, LoRAConfig(rank=rank, targets=["query"], init="gaussian", init_options={"b_std": 0.1}))
        opt = PreconditionedOptimizer(model, lr=1e-2, weight_decay=0.1)
        model(**batches("bert", 1)[0]).loss.backward()
        opt.step()
        return model, opt

    _, small = trained(2)
    model, opt = trained(4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in opt.state_dict()["base"]["state"][0].items()}
    with pytest.raises(ValueError, match="shape \\(2, 32\\), the parameter \\(4, 32\\).*nothing was loaded"):
        opt.load_state_dict(small.state_dict())
    assert all(torch.equal(v, opt.state_dict()["base"]["state"][0][k]) for k, v in state.items())
    model(**batches("bert", 1)[0]).loss.backward()
    opt.step()  # still steps normally
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


# 8 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init,options,message", [
    ("gaussian", {"offset": "no"}, "option offset='no' of initializer 'gaussian' must be true or false"),
    ("lora_ga", {"num_batches": True}, "option num_batches=True of initializer 'lora_ga' must be an integer"),
    ("gaussian", {"std": "0.1"}, "option std='0.1' of initializer 'gaussian' must be a finite number"),
    ("lora_ga", {"stable_gamma": math.inf}, "option stable_gamma=inf of initializer 'lora_ga' must be a finite"),
    ("gaussian", {"b_std": math.nan}, "option b_std=nan"),
])
def test_08_option_types_and_values(init, options, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(rank=2, targets=["x"], init=init, init_options=options)


def test_08_preconditioner_options_are_checked_the_same_way():
    with pytest.raises(ValueError, match="option ratio='16' of preconditioner 'lora_plus' must be a finite number"):
        lowrank.get_preconditioner("lora_plus")(ratio="16")


# 9 ----------------------------------------------------------------------------------------------
def test_09_malformed_adapter_files(tmp_path):
    _saved_bert(tmp_path)
    good = _files(tmp_path)
    meta = json.loads(good[CONFIG_NAME])
    layer = "bert.encoder.layer.0.attention.self.query"

    def edit(fn):
        (tmp_path / WEIGHTS_NAME).write_bytes(good[WEIGHTS_NAME])
        m = json.loads(good[CONFIG_NAME])
        fn(m)
        _rewrite(tmp_path, m)

    edit(lambda m: m["layers"][layer].pop("d_out"))
    _rejects(tiny_bert(), tmp_path, f"layer '{layer}': d_out must be a positive integer, got '<missing>'")
    edit(lambda m: m["config"].update(rank=4))
    _rejects(tiny_bert(), tmp_path, r"\(rank, alpha, scaling\) = \(2, .*the file's config gives \(4,")
    edit(lambda m: m["layers"][layer].update(rank=3))
    _rejects(tiny_bert(), tmp_path, "rank, alpha, scaling")
    edit(lambda m: m.update(layers=[]))
    _rejects(tiny_bert(), tmp_path, "'layers' must be a non-empty mapping")
    edit(lambda m: m["config"].update(alpha=-1))
    _rejects(tiny_bert(), tmp_path, "invalid 'config'")
    tensors = st_load(good[WEIGHTS_NAME])
    for bad, match in ((lambda t: t.fill_(math.nan), "non-finite values"),
                       (lambda t: t.to(torch.int64), "is torch.int64")):
        crafted = dict(tensors)
        crafted[f"layers.{layer}.A"] = bad(crafted[f"layers.{layer}.A"].clone())
        (tmp_path / CONFIG_NAME).write_bytes(good[CONFIG_NAME])
        _rewrite(tmp_path, json.loads(good[CONFIG_NAME]), crafted)
        _rejects(tiny_bert(), tmp_path, match)
    for name, blob in good.items():  # the untouched pair still loads: each rejection was the edit's doing
        (tmp_path / name).write_bytes(blob)
    assert len(list(lowrank.adapted_layers(lowrank.load_adapter(tiny_bert(), tmp_path)))) == len(meta["layers"])


def test_save_interrupted_between_its_two_files_keeps_the_previous_save(tmp_path, monkeypatch):
    import os

    model = _saved_bert(tmp_path)
    x = batches("bert", 1)[0]
    with torch.no_grad():
        want = model(**x).logits
        for _, layer in lowrank.adapted_layers(model):
            layer.B.add_(1.0)
    real, calls = os.replace, []

    def crash_on_config(src, dst):
        calls.append(dst)
        if str(dst).endswith(CONFIG_NAME):
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(OSError, match="killed"):
        lowrank.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert len(calls) == 2  # the new weights landed, the new config did not
    with pytest.warns(UserWarning, match="the last save was interrupted"):
        fresh = lowrank.load_adapter(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, want)
    lowrank.save_adapter(model, tmp_path)  # a complete save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, LOCK_NAME])


# 10 ---------------------------------------------------------------------------------------------
def test_10_non_finite_offset_base_weight_rolls_back():
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(FloatingPointError, match="offset base weight .* is not finite"):
        lowrank.inject(model, LoRAConfig(rank=2, targets=["query"], init="gaussian",
                                         init_options={"std": 1e30, "b_std": 1e30}))
    snap.assert_unchanged()


# fuzzing ----------------------------------------------------------------------------------------
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2))
INITS = lowrank.list_initializers(uses_data=False, adapter_kind="factors")  # every data-free factor init


REACHED: dict[str, int] = {}


def _reached(what: str) -> None:
    event(what)  # shown by --hypothesis-show-statistics
    REACHED[what] = REACHED.get(what, 0) + 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(init=st.sampled_from(INITS), data=st.data(), value=st.one_of(st.floats(0.001, 2), VALUES),
       rank=st.one_of(st.integers(1, 8), st.integers(-1, 40), st.floats(0, 5), st.booleans()),
       alpha=st.one_of(st.floats(0.5, 32), VALUES))
def _fuzz_config_values(init, data, value, rank, alpha):
    own = lowrank.registry.INITIALIZERS.entry(init).capabilities["options"]  # this init's options, and a typo
    option = data.draw(st.one_of(st.none(), st.sampled_from([*own, "typo"])), label="option")
    try:
        cfg = LoRAConfig(rank=rank, alpha=alpha, targets=["query"], init=init,
                         init_options={} if option is None else {option: value})
    except ValueError:
        _reached("config rejected")
        return
    _reached("inject reached")
    model = tiny_bert()
    snap = Snapshot(model)
    x = batches("bert", 1)[0]
    with torch.no_grad():
        y0 = model(**x).logits
    try:
        lowrank.inject(model, cfg, progress=False)
    except (ValueError, FloatingPointError):
        snap.assert_unchanged()
        return
    with torch.no_grad():
        y = model(**x).logits
    assert torch.isfinite(y).all()
    assert torch.allclose(y, y0, atol=1e-4)  # every one of these inits preserves the output


def test_fuzz_config_values():
    """Any value either builds a config that injects correctly, or is a ValueError; never another
    exception, and a failed inject leaves the model as it was. The fuzz must reach inject, not only the
    config's checks: the counts are asserted."""
    REACHED.clear()
    _fuzz_config_values()
    assert REACHED.get("inject reached", 0) >= 5 and REACHED.get("config rejected", 0) >= 5, REACHED


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(rank=2, targets=["query", "value"], trainable=["classifier"], init="pissa"))
    with torch.no_grad():
        for _, layer in lowrank.adapted_layers(model):
            layer.B.add_(0.05)
    lowrank.save_adapter(model, path)
    x = batches("bert", 1)[0]
    with torch.no_grad():
        return path, _files(path), model(**x).logits, x


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_adapter_files(saved_adapter, data, tmp_path_factory):
    """Random edits of JSON fields and of tensor-file bytes (header included), with or without a fixed-up
    checksum: loading either reproduces the saved model's outputs exactly or raises AdapterFileError with
    the model and the files unchanged."""
    src, good, want, x = saved_adapter
    path = tmp_path_factory.mktemp("case")
    meta = json.loads(good[CONFIG_NAME])
    blob = bytearray(good[WEIGHTS_NAME])
    if data.draw(st.booleans(), label="edit json"):
        keys = data.draw(st.sampled_from(sorted(_paths(meta))), label="field")
        parent = meta
        for k in keys[:-1]:
            parent = parent[k]
        if data.draw(st.booleans(), label="delete"):
            del parent[keys[-1]]
        else:
            parent[keys[-1]] = data.draw(VALUES, label="value")
    else:
        header = int.from_bytes(blob[:8], "little") + 8
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, min(len(blob) - 1, header + 64)), label="byte")
            blob[i] = data.draw(st.integers(0, 255), label="to")
    (path / WEIGHTS_NAME).write_bytes(bytes(blob))
    if data.draw(st.booleans(), label="fix checksum") and isinstance(meta, dict):
        meta["weights_sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    model, files = tiny_bert(), _files(path)
    snap = Snapshot(model)
    try:
        lowrank.load_adapter(model, path)
    except AdapterFileError:
        snap.assert_unchanged()
        assert _files(path) == files
        return
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)
