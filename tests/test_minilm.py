"""The offline pretrained MiniLM on real WordNet data (marked slow: bash scripts/test.sh --slow)."""

from __future__ import annotations

import pytest
import torch

import lowrank

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wordnet():
    from lowrank_ablation.data.wordnet import supersense_splits

    return supersense_splits(n_train=256, n_eval=64)


def test_minilm_inject_train_save_reload(wordnet, tmp_path):
    from lowrank_ablation.data.batches import classification_batches
    from lowrank_ablation.data.minilm import load_minilm_classifier

    train, evaluation = wordnet
    n = train.features["label"].num_classes
    model, tok = load_minilm_classifier(n)
    model.eval()
    probe = next(classification_batches(evaluation, tok, 16))
    with torch.no_grad():
        y0 = model(**probe).logits
    cfg = lowrank.LoRAConfig(rank=8, alpha=16, targets=["query", "key", "value", "dense"], trainable=["classifier"])
    lowrank.inject(model, cfg)
    assert len(dict(lowrank.adapted_layers(model))) == 37  # 36 encoder linears + pooler.dense
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, y0)
    opt = torch.optim.AdamW(lowrank.trainable_parameters(model).values(), lr=1e-3)
    model.train()
    losses = []
    for batch in classification_batches(train, tok, 32, shuffle=True):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    lowrank.save_adapter(model, tmp_path)
    fresh, _ = load_minilm_classifier(n)
    lowrank.load_adapter(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(**probe).logits, model(**probe).logits)
