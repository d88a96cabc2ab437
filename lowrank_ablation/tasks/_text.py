"""Shared by the text-classification tasks: sequence classification on ``datasets.Dataset`` splits with
``text`` and ``label`` columns, scored by loss and argmax accuracy (each example's hit kept as its outcome,
for the runner's per-example interval)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import Built, Task, restoring_modes


class TextClassification(Task):
    """Base of the text classifiers (not registered itself)."""

    metrics = {"loss": "min", "accuracy": "max"}
    headline = "accuracy"
    units = {"loss": "cross-entropy, nats per example", "accuracy": "fraction correct"}
    example = "texts"
    default_targets: Any = ["query", "key", "value", "dense"]

    def __init__(self, options, load_model: Callable[[int], tuple[nn.Module, Any]], train, val, test):
        super().__init__(options)
        self.load_model, self.train_ds, self.val_ds, self.test_ds = load_model, train, val, test

    def build(self, seed: int, batch_size: int) -> Built:
        from lowrank_ablation.data.batches import classification_batches

        label = self.train_ds.features["label"]
        n = label.num_classes if hasattr(label, "num_classes") else len(set(self.train_ds["label"]))
        torch.manual_seed(seed)  # the new head
        model, tok = self.load_model(n)
        o = self.options
        ml = getattr(o, "max_length", 64)
        init = list(classification_batches(self.train_ds, tok, batch_size, shuffle=True, seed=seed + 10_000,
                                           max_length=ml))[: o.init_batches]
        return Built(model=model, targets=getattr(o, "targets", None) or self.default_targets,
                     head=list(getattr(o, "head", None) or ["classifier"]),
                     train=classification_batches(self.train_ds, tok, batch_size, shuffle=True, seed=seed, epochs=None,
                                                  max_length=ml),
                     init_batches=init,
                     val_batches=list(classification_batches(self.val_ds, tok, 128, max_length=ml)),
                     test_batches=list(classification_batches(self.test_ds, tok, 128, max_length=ml)))

    def evaluate(self, model, batches, progress: bool = False) -> dict[str, float]:
        loss, hits = 0.0, []
        with restoring_modes(model), torch.no_grad():
            for b in batches:
                out = model(**b)
                loss += out.loss.item() * len(b["labels"])
                hits += (out.logits.argmax(-1) == b["labels"]).int().tolist()
        return {"loss": loss / len(hits), "accuracy": sum(hits) / len(hits), "outcomes": {"accuracy": hits}}
