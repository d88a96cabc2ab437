"""Threat: adapter files and saves (issue "Nothing silent, round two", items 4, 5, 9, 11b): two failed saves in
a row, two processes saving to one directory, hostile JSON, a trainable entry that reaches into a target, an
adapter made with a plug-in that is not installed, PEFT's trainable tokens."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings

import pytest
import torch

import lowrank
from lowrank.io import CONFIG_NAME, AdapterFileError
from tests.conftest import Snapshot, batches, tiny_bert


def _model(seed=0, b=0.1):
    model = tiny_bert()
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["query"], init="gaussian", init_options={"b_std": b},
                                             seed=seed))
    return model


def _logits(model):
    with torch.no_grad():
        return model.eval()(**batches("bert", 1)[0]).logits


def test_two_failed_saves_in_a_row_keep_the_last_complete_save(tmp_path, monkeypatch):
    good = _model(seed=1)
    lowrank.save_adapter(good, tmp_path)
    want = _logits(good)
    real = os.replace

    def crash_on_config(src, dst):  # the new weights land, the new config does not
        if str(dst).endswith(CONFIG_NAME):
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    for seed in (2, 3):  # the second failure must not replace the fallback with the inconsistent pair
        with pytest.raises(OSError, match="killed"):
            lowrank.save_adapter(_model(seed=seed), tmp_path)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="the last save was interrupted"):
        fresh = lowrank.load_adapter(tiny_bert(), tmp_path)
    assert torch.equal(_logits(fresh), want)


def _saver(path: str, seed: int, n: int, queue) -> None:
    torch.set_num_threads(1)
    try:
        model = _model(seed=seed)
        for _ in range(n):
            lowrank.save_adapter(model, path)
        queue.put(("ok", seed))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((f"{type(exc).__name__}: {exc}", seed))


def test_two_processes_saving_to_one_directory_never_collide(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_saver, args=(str(tmp_path), seed, 60, q)) for seed in (1, 2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    assert results == [("ok", 1), ("ok", 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete pair: no fallback needed
        fresh = lowrank.load_adapter(tiny_bert(), tmp_path)
    assert any(torch.equal(_logits(fresh), _logits(_model(seed=s))) for s in (1, 2))  # the last complete save


def _edit(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("text,message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "lowrank-adapter", "format_version": ' + "9" * 5000 + "}", "not valid JSON: Exceeds the limit"),
])
def test_hostile_json_is_an_adapter_file_error(tmp_path, text, message):
    lowrank.save_adapter(_model(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(text)
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        lowrank.load_adapter(model, tmp_path)
    snap.assert_unchanged()


def test_huge_integers_and_a_trainable_entry_reaching_into_a_target_are_adapter_file_errors(tmp_path):
    lowrank.save_adapter(_model(), tmp_path)
    layer = "bert.encoder.layer.0.attention.self.query"
    _edit(tmp_path, lambda m: m["layers"][layer].update(rank=10 ** 40))
    with pytest.raises(AdapterFileError, match="rank"):
        lowrank.load_adapter(tiny_bert(), tmp_path)
    for entry, verb in ((layer, "is"), ("bert.encoder", "contains")):
        lowrank.save_adapter(_model(), tmp_path)

        def add(m, entry=entry):
            m["config"]["trainable"] = [entry]
            m["trainable"] = [entry]
        _edit(tmp_path, add)
        model = tiny_bert()
        snap = Snapshot(model)
        with pytest.raises(AdapterFileError, match=f"trainable module {entry!r} {verb} the adapted layer"):
            lowrank.load_adapter(model, tmp_path)
        snap.assert_unchanged()


def test_an_adapter_made_with_a_plugin_that_is_not_installed_loads_from_its_tensors(tmp_path):
    from lowrank.init.pissa import PiSSA

    @lowrank.register_initializer("lab_pissa_variant")
    class LabVariant(PiSSA):
        """A user's own initializer (an offset one)."""

    try:
        model = tiny_bert()
        lowrank.inject(model, lowrank.LoRAConfig(rank=2, alpha=4, targets=["query"], init="lab_pissa_variant"))
        with torch.no_grad():
            for _, layer in lowrank.adapted_layers(model):
                layer.B.add_(0.05)  # as if trained
        lowrank.save_adapter(model, tmp_path / "a")
        want = _logits(model)
    finally:
        lowrank.registry.INITIALIZERS.unregister("lab_pissa_variant")
    with pytest.warns(UserWarning, match="made with initializer 'lab_pissa_variant', which is not installed here"):
        fresh = lowrank.load_adapter(tiny_bert(), tmp_path / "a")
    assert torch.equal(_logits(fresh), want)  # W0 - s B0 A0 rebuilt from the stored A0, B0
    lowrank.save_adapter(fresh, tmp_path / "b")  # the name is kept
    assert json.loads((tmp_path / "b" / CONFIG_NAME).read_text())["config"]["init"] == "lab_pissa_variant"


def test_a_frozen_factor_stays_frozen_when_its_initializer_is_not_installed(tmp_path):
    """A MiCA-style initializer freezes B; loaded where the initializer is missing (read as kaiming, which
    freezes nothing), B must still come back frozen: the file carries each layer's frozen tensors."""
    from lowrank.init.mica import MiCA

    @lowrank.register_initializer("lab_mica_variant")
    class LabMiCA(MiCA):
        """A user's own initializer that keeps B fixed."""

    try:
        model = tiny_bert()
        lowrank.inject(model, lowrank.LoRAConfig(rank=2, alpha=4, targets=["query"], init="lab_mica_variant"))
        assert all(not layer.B.requires_grad and layer.A.requires_grad for _, layer in lowrank.adapted_layers(model))
        lowrank.save_adapter(model, tmp_path)
    finally:
        lowrank.registry.INITIALIZERS.unregister("lab_mica_variant")
    with pytest.warns(UserWarning, match="not installed here"):
        fresh = lowrank.load_adapter(tiny_bert(), tmp_path)
    layers = list(lowrank.adapted_layers(fresh))
    assert layers and all(not layer.B.requires_grad and layer.A.requires_grad for _, layer in layers)
    _edit(tmp_path, lambda m: next(iter(m["layers"].values())).update(frozen=["C"]))
    with pytest.raises(AdapterFileError, match=r"frozen must be a list of the layer's tensors \['A', 'B'\], got \['C'\]"):
        lowrank.load_adapter(tiny_bert(), tmp_path)


def test_an_adapter_layer_that_is_not_installed_names_itself_and_how_to_install(tmp_path):
    lowrank.save_adapter(_model(), tmp_path)
    _edit(tmp_path, lambda m: m["config"].update(adapter="lab_adapter"))
    with pytest.raises(AdapterFileError, match="adapter layer 'lab_adapter', which is not installed here.*install "
                                               "the package that registers it"):
        lowrank.load_adapter(tiny_bert(), tmp_path)


def test_peft_trainable_tokens_are_refused_as_what_they_are(tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"],
                                                              trainable_token_indices=[1, 2]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match="trainable_token_indices .* cannot be loaded as lowrank LoRA"):
        lowrank.peft.load(tiny_bert(), tmp_path)


def test_a_config_trainable_pattern_that_names_a_target_is_an_adapter_file_error(tmp_path):
    """The file's ``trainable`` list is clean but its config's ``trainable`` patterns also name the adapted layer
    (an edited file): an ``AdapterFileError`` before the model is touched, not plan's ``ValueError``."""
    def fresh():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    model = fresh()
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["0"], trainable=["2"], init="gaussian"))
    lowrank.save_adapter(model, tmp_path)
    _edit(tmp_path, lambda m: m["config"].update(trainable=["0", "2"]))
    for target in (fresh(), lowrank.inject(fresh(), lowrank.LoRAConfig(rank=2, targets=["0"], init="gaussian"))):
        snap = Snapshot(target)
        with pytest.raises(AdapterFileError, match=r"trainable pattern '0' names the adapted layer '0'"):
            lowrank.load_adapter(target, tmp_path)
        snap.assert_unchanged()
