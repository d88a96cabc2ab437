"""``wordnet-supersense``: the offline MiniLM classifying WordNet definitions into their 41 supersenses
(``lowrank_ablation.data.wordnet``: a ``datasets.Dataset``, fixed stratified, disjoint splits)."""

from __future__ import annotations

from dataclasses import dataclass

from ._text import TextClassification
from .base import positive, register_task


@register_task("wordnet-supersense")
class WordNetSupersense(TextClassification):
    """MiniLM (offline) + a new 41-way head on WordNet definitions -> supersense."""

    @dataclass(frozen=True)
    class Options:
        n_train: int = 4800
        n_val: int = 500
        n_test: int = 1000
        init_batches: int = 4
        split_seed: int = 0

        def __post_init__(self):
            positive(self, "n_train", "n_val", "n_test", "init_batches")

    default_targets = r"encoder\..*\.(query|key|value|dense)"

    def __init__(self, options):
        from lowrank_ablation.data.minilm import load_minilm_classifier
        from lowrank_ablation.data.wordnet import supersense_train_val_test

        o = options
        splits = supersense_train_val_test(n_train=o.n_train, n_val=o.n_val, n_test=o.n_test, seed=o.split_seed)
        super().__init__(options, load_minilm_classifier, *splits)

    @classmethod
    def describe(cls, options) -> str:
        return "WordNet supersenses, MiniLM-L6 (all-MiniLM-L6-v2)"
