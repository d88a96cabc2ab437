"""Shared by the tasks that score generated text (``causal-lm``, ``causal-lm-code``, ``seq2seq``): the seeded
training stream, evaluation batches grouped by length, and ``build`` around a Hugging Face auto class."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from .base import Built, Task


@dataclass(frozen=True)
class Splits:
    """The split options every generation task's ``Options`` start with (the tasks add their own after them)."""

    n_train: int = 4000
    """Training examples carved from ``data``."""
    n_val: int = 200
    """Validation examples carved from ``data`` (rates are chosen on them)."""
    n_test: int = 500
    """Test examples: carved from ``data``, or the first of ``test_data`` when it is set."""
    init_batches: int = 4
    """Batches a data-driven initializer reads (LoRA-GA's gradient, EVA's inputs)."""
    split_seed: int = 0
    """The seed of the split (fixed across the sweep's seeds, so every run sees the same examples)."""


class Generative(Task):
    """Base of the generation tasks (not registered itself). A subclass sets ``auto_model`` (the ``transformers``
    auto class that loads ``self.path``), fills ``train_set`` / ``val_set`` / ``test_set`` with encoded rows whose
    first two items are token lists, and defines ``collate`` and ``eval_batch``."""

    auto_model: ClassVar[str]
    path: str
    train_set: list
    val_set: list
    test_set: list

    def _load_tokenizer(self, path: str) -> None:
        """``path``, ``tok`` and ``pad_id`` (EOS when the tokenizer has no pad token); ``ValueError`` for a tokenizer
        without EOS (a generated sequence would have no end)."""
        from transformers import AutoTokenizer

        self.path = path
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.eos_token_id is None:
            raise ValueError(f"model = {self.options.model!r}: its tokenizer has no EOS token, so a generated sequence "
                             "has no end; use a tokenizer with eos_token set")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_batch(self, rows: list) -> dict[str, Any]:
        raise NotImplementedError

    def _eval_batches(self, rows: list) -> list[dict[str, Any]]:
        order = sorted(rows, key=lambda r: (len(r[0]), len(r[1])))  # similar lengths together: less padding
        n = self.options.eval_batch_size
        return [self.eval_batch(order[i:i + n]) for i in range(0, len(order), n)]

    def _test_batches(self) -> list[dict[str, Any]]:
        return self._eval_batches(self.test_set)

    def _stream(self, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:  # epochs without end, reshuffled by a seeded generator
            order = torch.randperm(len(self.train_set), generator=g).tolist()
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield self.collate([self.train_set[i] for i in order[start:start + batch_size]])

    def build(self, seed: int, batch_size: int) -> Built:
        import transformers

        if batch_size > len(self.train_set):
            raise ValueError(f"batch_size = {batch_size} is larger than the {len(self.train_set)} training examples; "
                             "lower batch_size or raise n_train")
        torch.manual_seed(seed)
        with quiet_loading():  # a bar per run would bury the runner's own
            model = getattr(transformers, self.auto_model).from_pretrained(self.path, dtype=torch.float32)
        init = self._stream(seed + 10_000, batch_size)
        return Built(model=model, targets=self.options.targets, head=[], train=self._stream(seed, batch_size),
                     init_batches=[next(init) for _ in range(self.options.init_batches)],
                     val_batches=self._eval_batches(self.val_set), test_batches=self._test_batches())


@contextlib.contextmanager
def quiet_loading():
    """``transformers``' loading bars off inside the block (restored after)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
