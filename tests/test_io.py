"""save_adapter / load_adapter: bitwise round trips, rebuild from the original model, bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch

import lowrank
from lowrank import LoRAConfig
from lowrank.io import CONFIG_NAME, LOCK_NAME, WEIGHTS_NAME, AdapterFileError

from .conftest import MODELS, Snapshot, batches, tiny_bert


@pytest.fixture(scope="module", autouse=True)
def _offset_init():
    @lowrank.register_initializer("test_io_offset")
    class OffsetInit(lowrank.Initializer):
        """Non-zero A and B with offset (exercises A0/B0 bookkeeping)."""

        def init_layer(self, ctx):
            return lowrank.InitResult(A=0.3 * ctx.randn(ctx.rank, ctx.n), B=0.3 * ctx.randn(ctx.m, ctx.rank), offset=True)

    yield
    lowrank.registry.INITIALIZERS.unregister("test_io_offset")


def _train(model, kind, steps=3):
    opt = torch.optim.AdamW(lowrank.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for batch in batches(kind, steps, seed=5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("init", ["kaiming", "test_io_offset"])
def test_finetuned_adapter_rebuilds_from_original_model(tiny, tmp_path, init):
    kind, model, targets, trainable = tiny
    factory = MODELS[kind][0]
    lowrank.inject(model, LoRAConfig(rank=3, alpha=6, targets=targets, trainable=trainable, init=init))
    _train(model, kind)
    lowrank.save_adapter(model, tmp_path / "a")
    # no temp files left; the lock file that serializes saves stays
    assert sorted(os.listdir(tmp_path / "a")) == sorted([CONFIG_NAME, WEIGHTS_NAME, LOCK_NAME])
    fresh = lowrank.load_adapter(factory(), tmp_path / "a")
    want = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, want[name]), f"{name} differs after reload"
        assert p.requires_grad == want[name].requires_grad, name
    batch = batches(kind, 1, seed=9)[0]
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


def test_load_into_injected_model_resumes(tmp_path):
    model = tiny_bert()
    cfg = LoRAConfig(rank=2, targets=["query", "value"], trainable=["classifier"], init="test_io_offset")
    lowrank.inject(model, cfg)
    lowrank.save_adapter(model, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, "bert")
    lowrank.load_adapter(model, tmp_path)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(rank=2, targets=["query"]))
    lowrank.save_adapter(model, tmp_path)
    files = {f: (tmp_path / f).read_bytes() for f in (CONFIG_NAME, WEIGHTS_NAME)}
    _train(model, "bert")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        lowrank.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert {f: (tmp_path / f).read_bytes() for f in files} == files
    assert sorted(os.listdir(tmp_path)) == sorted([*files, LOCK_NAME])


def _saved(tmp_path, **cfg):
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(**{"rank": 2, "targets": ["query", "value"], **cfg}))
    lowrank.save_adapter(model, tmp_path)
    return tmp_path


def _expect_unchanged(model, path, match):
    snap = Snapshot(model)
    with pytest.raises(AdapterFileError, match=match):
        lowrank.load_adapter(model, path)
    snap.assert_unchanged()


def test_missing_adapter(tmp_path):
    _expect_unchanged(tiny_bert(), tmp_path / "nowhere", "no adapter at .*missing lowrank_config.json")


def test_corrupted_or_partial_weights(tmp_path):
    path = _saved(tmp_path)
    blob = bytearray((path / WEIGHTS_NAME).read_bytes())
    blob[-3] ^= 0xFF
    (path / WEIGHTS_NAME).write_bytes(bytes(blob))
    _expect_unchanged(tiny_bert(), path, "corrupted or a save was interrupted")
    (path / WEIGHTS_NAME).write_bytes(bytes(blob[: len(blob) // 2]))
    _expect_unchanged(tiny_bert(), path, "corrupted or a save was interrupted")


def test_corrupted_config(tmp_path):
    path = _saved(tmp_path)
    (path / CONFIG_NAME).write_text('{"format": "lowrank-adapter", ')
    _expect_unchanged(tiny_bert(), path, "not valid JSON")


def test_adapter_for_another_model_names_first_mismatch(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    path = _saved(tmp_path)
    torch.manual_seed(0)
    wider = BertForSequenceClassification(BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=48, vocab_size=97, num_labels=3)).eval()
    _expect_unchanged(wider, path, r"does not fit layer 'bert.encoder.layer.0.attention.self.query'.*\(32, 32\).*\(40, 40\)")
    deeper = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                      intermediate_size=48, vocab_size=97, num_labels=3)).eval()
    _expect_unchanged(deeper, path, "model layer 'bert.encoder.layer.2.attention.self.query' is a target but the adapter has no weights")


def test_loading_into_differently_injected_model(tmp_path):
    path = _saved(tmp_path)
    model = tiny_bert()
    lowrank.inject(model, LoRAConfig(rank=4, targets=["query", "value"]))
    _expect_unchanged(model, path, "adapter has rank 2 .* model has rank 4")
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["lowrank_version"] == lowrank.__version__ and meta["config"]["rank"] == 2
