"""``hf-text-classification``: any Hugging Face sequence classifier and a dataset with a text and a
label column, by hub name or local path/file (``.csv``, ``.json``/``.jsonl``, a ``save_to_disk``
folder). Named splits are used where the dataset has them, else stratified carve-outs of the train
split (test first, then validation), all disjoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._text import TextClassification
from .base import positive, register_task


@register_task("hf-text-classification")
class HFTextClassification(TextClassification):
    """A Hugging Face sequence classifier + a text/label dataset (hub name or local file)."""

    @dataclass(frozen=True)
    class Options:
        model: str | None = None
        dataset: str | None = None
        text_column: str = "text"
        label_column: str = "label"
        train_split: str = "train"
        val_split: str | None = None
        test_split: str | None = None
        n_train: int | None = None
        n_val: int = 500
        n_test: int = 1000
        init_batches: int = 4
        split_seed: int = 0
        targets: list[str] | str = field(default_factory=lambda: ["query", "key", "value", "dense"])
        head: list[str] = field(default_factory=lambda: ["classifier"])
        max_length: int = 64

        def __post_init__(self):
            positive(self, "n_train", "n_val", "n_test", "init_batches", "max_length")
            for key in ("model", "dataset"):
                if not isinstance(getattr(self, key), str) or not getattr(self, key):
                    raise ValueError(f"task 'hf-text-classification' needs {key} = \"<hub name or local path>\"")

    def __init__(self, options):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        def load_model(n):
            model = AutoModelForSequenceClassification.from_pretrained(options.model, num_labels=n)
            return model, AutoTokenizer.from_pretrained(options.model)
        super().__init__(options, load_model, *_load_splits(options))

    @classmethod
    def describe(cls, options) -> str:
        return f"{options.dataset}, {options.model}"


def _load_splits(o):
    import os

    import datasets

    src = o.dataset
    if src.endswith((".csv", ".json", ".jsonl")):
        ds = datasets.load_dataset("csv" if src.endswith(".csv") else "json", data_files=src)
    elif os.path.isdir(src) and os.path.exists(f"{src}/dataset_info.json"):
        ds = datasets.load_from_disk(src)
    else:
        ds = datasets.load_dataset(src)

    def named(d):
        return d.rename_columns({c: n for c, n in ((o.text_column, "text"), (o.label_column, "label")) if c != n})

    train = named(ds[o.train_split] if isinstance(ds, datasets.DatasetDict) else ds)
    if not isinstance(train.features["label"], datasets.ClassLabel):
        train = train.class_encode_column("label")
    parts = {}
    for which in ("test", "val"):  # test carved first, so a given test set never depends on n_val
        split = getattr(o, f"{which}_split")
        if split and isinstance(ds, datasets.DatasetDict):
            parts[which] = named(ds[split]).cast_column("label", train.features["label"])
        else:
            cut = train.train_test_split(test_size=min(getattr(o, f"n_{which}"), len(train) // 5), seed=o.split_seed,
                                         stratify_by_column="label")
            train, parts[which] = cut["train"], cut["test"]
    if o.n_train:
        train = train.select(range(min(o.n_train, len(train))))
    val, test = (parts[w].select(range(min(getattr(o, f"n_{w}"), len(parts[w])))) for w in ("val", "test"))
    return train, val, test
