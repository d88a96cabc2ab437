"""Tokenized, dynamically padded batches for text classification."""

from __future__ import annotations

from typing import Iterator

import torch


def classification_batches(dataset, tokenizer, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                           max_length: int = 64, epochs: int | None = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{"input_ids", "attention_mask", "labels"}`` batches, padded to the batch's longest text.

    ``epochs=None`` cycles forever (reshuffling each epoch with a seeded generator).
    """
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(len(dataset), generator=g).tolist() if shuffle else list(range(len(dataset)))
        for start in range(0, len(order) - batch_size + 1 if shuffle else len(order), batch_size):
            rows = dataset[order[start:start + batch_size]]
            enc = tokenizer(rows["text"], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                   "labels": torch.tensor(rows["label"])}
        epoch += 1
