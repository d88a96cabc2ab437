"""``hf-text-classification``: any Hugging Face sequence classifier and a dataset with a text and a
label column, by hub name or local path/file (``.csv``, ``.json``/``.jsonl``, a ``save_to_disk``
folder). Named splits are used where the dataset has them, else stratified carve-outs of the train
split (test first, then validation), all disjoint.

``test_dataset`` takes the test split from another source (its own split and column names; its labels
matched to the training labels by name, or by index when both are integers), as a paper that trains on one
corpus and tests on another; training and validation examples whose text is in that test set are dropped,
counted in ``test_overlap_dropped`` and printed."""

from __future__ import annotations

import sys
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
        test_dataset: str | None = None
        """A separate test source (hub name or local path/file, as ``dataset``); default: from ``dataset``."""
        test_text_column: str | None = None
        test_label_column: str | None = None
        """The test source's columns (default: ``text_column`` / ``label_column``); its split is ``test_split``
        (default ``"test"``, or a file's only split)."""

        def __post_init__(self):
            positive(self, "n_train", "n_val", "n_test", "init_batches", "max_length")
            for key in ("model", "dataset"):
                if not isinstance(getattr(self, key), str) or not getattr(self, key):
                    raise ValueError(f"task 'hf-text-classification' needs {key} = \"<hub name or local path>\"")
            if self.test_dataset is None and (self.test_text_column or self.test_label_column):
                raise ValueError("test_text_column / test_label_column are set but test_dataset is not: set "
                                 "test_dataset = \"<hub name or local path>\" or drop them")
            if self.test_dataset is not None and (not isinstance(self.test_dataset, str) or not self.test_dataset):
                raise ValueError(f"test_dataset must be a hub name or local path, got {self.test_dataset!r}")

    def __init__(self, options):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        def load_model(n):
            model = AutoModelForSequenceClassification.from_pretrained(options.model, num_labels=n)
            return model, AutoTokenizer.from_pretrained(options.model)
        train, val, test, self.test_overlap_dropped = _load_splits(options)
        if self.test_overlap_dropped:
            print(f"hf-text-classification: dropped {self.test_overlap_dropped} training/validation example(s) whose "
                  f"text is in the test source {options.test_dataset!r}", file=sys.stderr)
        super().__init__(options, load_model, train, val, test)

    @classmethod
    def describe(cls, options) -> str:
        return f"{options.dataset}, {options.model}"


def _load(src: str):
    import os

    import datasets

    if src.endswith((".csv", ".json", ".jsonl")):
        return datasets.load_dataset("csv" if src.endswith(".csv") else "json", data_files=src)
    if os.path.isdir(src) and os.path.exists(f"{src}/dataset_info.json"):
        return datasets.load_from_disk(src)
    return datasets.load_dataset(src)


def _named(d, text: str, label: str, where: str):
    missing = [c for c in (text, label) if c not in d.column_names]
    if missing:
        raise ValueError(f"{where}: no column(s) {missing}; its columns are {d.column_names} (set "
                         "text_column / label_column, or test_text_column / test_label_column for the test source)")
    return d.rename_columns({c: n for c, n in ((text, "text"), (label, "label")) if c != n})


def _with_labels_of(d, classes, where: str):
    """``d`` with its labels as ``classes`` (a ClassLabel): by name, or by index when ``d``'s are integers."""
    import datasets

    feat = d.features["label"]
    if isinstance(feat, datasets.ClassLabel):
        unlabelled = sorted({v for v in d["label"] if not 0 <= v < feat.num_classes})
        if unlabelled:  # GLUE's hidden test labels are -1: never read as a class (names[-1] is the last one)
            raise ValueError(f"{where}: label index(es) {unlabelled[:5]} are not classes (-1 marks an unlabelled "
                             "row, as in GLUE's test splits); test on a labelled split (e.g. test_split = "
                             "\"validation\")")
        values = [feat.names[v] for v in d["label"]]
    else:
        values = d["label"]
    named_by_ints = all(n.lstrip("-").isdigit() for n in classes.names)  # classes encoded from integer labels
    if values and not named_by_ints and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = sorted({v for v in values if not 0 <= v < classes.num_classes})
        if bad:
            raise ValueError(f"{where}: label index(es) {bad[:5]} outside the training labels' 0..{classes.num_classes - 1}")
        ids = list(values)
    else:
        unknown = sorted({str(v) for v in values} - set(classes.names))
        if unknown:
            raise ValueError(f"{where}: label(s) {unknown[:5]} are not among the training labels {classes.names}")
        ids = [classes.str2int(str(v)) for v in values]
    return d.remove_columns("label").add_column("label", ids).cast_column("label", classes)


def _load_splits(o):
    import datasets

    ds = _load(o.dataset)
    train = _named(ds[o.train_split] if isinstance(ds, datasets.DatasetDict) else ds, o.text_column, o.label_column,
                   f"dataset {o.dataset!r}")
    if not isinstance(train.features["label"], datasets.ClassLabel):
        train = train.class_encode_column("label")
    parts = {}
    if o.test_dataset is not None:
        parts["test"] = _test_source(o, train.features["label"])
    for which in ("test", "val"):  # test carved first, so a given test set never depends on n_val
        split = getattr(o, f"{which}_split")
        if which in parts:
            continue
        if split and isinstance(ds, datasets.DatasetDict):
            parts[which] = _named(ds[split], o.text_column, o.label_column, f"dataset {o.dataset!r} split {split!r}"
                                  ).cast_column("label", train.features["label"])
        else:
            cut = train.train_test_split(test_size=min(getattr(o, f"n_{which}"), len(train) // 5), seed=o.split_seed,
                                         stratify_by_column="label")
            train, parts[which] = cut["train"], cut["test"]
    val, test = (parts[w].select(range(min(getattr(o, f"n_{w}"), len(parts[w])))) for w in ("val", "test"))
    dropped = 0
    if o.test_dataset is not None:  # nothing of the test source is trained on or selected with
        seen = set(test["text"])
        sizes = len(train), len(val)
        train, val = (d.filter(lambda row: row["text"] not in seen) for d in (train, val))
        dropped = sizes[0] - len(train) + sizes[1] - len(val)
    if o.n_train:
        train = train.select(range(min(o.n_train, len(train))))
    return train, val, test, dropped


def _test_source(o, classes):
    import datasets

    ds = _load(o.test_dataset)
    where = f"test_dataset {o.test_dataset!r}"
    if isinstance(ds, datasets.DatasetDict):
        split = o.test_split or ("test" if "test" in ds or len(ds) != 1 else next(iter(ds)))  # a file: its one split
        if split not in ds:
            raise ValueError(f"{where} has no split {split!r}; its splits are {list(ds)} (set test_split)")
        ds, where = ds[split], f"{where} split {split!r}"
    d = _named(ds, o.test_text_column or o.text_column, o.test_label_column or o.label_column, where)
    return _with_labels_of(d, classes, where)
