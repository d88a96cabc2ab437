"""Tasks: a fresh model, its LoRA targets and head, and seeded data streams.

- ``wordnet-supersense``: the offline MiniLM classifying WordNet definitions into their 41
  supersenses (``lowrank.data.wordnet``, a ``datasets.Dataset``, fixed stratified split).
- ``hf-text-classification``: any Hugging Face sequence classifier + a dataset with a text and a
  label column, by hub name or local path/file (``.csv``, ``.json``/``.jsonl``, a
  ``save_to_disk`` folder). The WordNet task goes through the same code (``_TextTask``).
- ``synthetic-lowrank``: a random two-layer "pretrained" MLP whose fine-tuning target is a known
  rank-``k`` change of both weights; mean-squared error. Fast; for CI and theory at scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

WORDNET_OPTIONS = {"n_train": 4800, "n_val": 500, "n_test": 1000, "init_batches": 4, "split_seed": 0}
HF_OPTIONS = {"model": None, "dataset": None, "text_column": "text", "label_column": "label", "train_split": "train",
              "val_split": None, "test_split": None, "n_train": None, "n_val": 500, "n_test": 1000,
              "init_batches": 4, "split_seed": 0, "targets": ["query", "key", "value", "dense"], "head": ["classifier"],
              "max_length": 64}
SYNTH_OPTIONS = {"d_in": 64, "hidden": 128, "d_out": 32, "true_rank": 4, "shift": 1.0, "n_val": 512, "n_test": 1024,
                 "init_batches": 4, "data_seed": 0}
METRICS = {"wordnet-supersense": ("loss", "accuracy"), "hf-text-classification": ("loss", "accuracy"),
           "synthetic-lowrank": ("loss",)}
"""The final metrics each task reports on its validation and test splits."""
DEFAULTS = {"wordnet-supersense": WORDNET_OPTIONS, "hf-text-classification": HF_OPTIONS,
            "synthetic-lowrank": SYNTH_OPTIONS}


def check_task_options(task: str, options: dict[str, Any], where: str) -> None:
    valid = DEFAULTS[task]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for task {task!r}; valid: {sorted(valid)}")
    for key in ("n_train", "n_val", "n_test", "init_batches", "d_in", "hidden", "d_out", "true_rank", "max_length"):
        v = options.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{where}: {key} must be a positive integer, got {v!r}")
    if task == "hf-text-classification":
        for key in ("model", "dataset"):
            if not isinstance(options.get(key), str) or not options[key]:
                raise ValueError(f"{where}: task 'hf-text-classification' needs {key} = \"<hub name or local path>\"")


@dataclass
class Built:
    """Everything one run needs."""

    model: nn.Module
    targets: Any
    head: list[str]
    train: Iterator[Any]
    init_batches: list[Any]
    val_batches: list[Any]
    """Model selection (learning-rate search) and the eval curve."""
    test_batches: list[Any]
    """Reported only; never used to choose anything."""
    accuracy: bool


class _TextTask:
    """Sequence classification on a ``datasets.Dataset`` with ``text`` and ``label`` columns."""

    def __init__(self, load_model: Callable[[int], tuple[nn.Module, Any]], train, val, test, options):
        self.load_model, self.train_ds, self.val_ds, self.test_ds, self.o = load_model, train, val, test, options

    def build(self, seed: int, batch_size: int) -> Built:
        from lowrank.data.batches import classification_batches

        n = self.train_ds.features["label"].num_classes if hasattr(self.train_ds.features["label"], "num_classes") \
            else len(set(self.train_ds["label"]))
        torch.manual_seed(seed)  # the new head
        model, tok = self.load_model(n)
        ml = self.o.get("max_length", 64)
        init = list(classification_batches(self.train_ds, tok, batch_size, shuffle=True, seed=seed + 10_000,
                                           max_length=ml))[: self.o["init_batches"]]
        return Built(model=model, targets=self.o.get("targets") or r"encoder\..*\.(query|key|value|dense)",
                     head=list(self.o.get("head") or ["classifier"]),
                     train=classification_batches(self.train_ds, tok, batch_size, shuffle=True, seed=seed, epochs=None,
                                                  max_length=ml),
                     init_batches=init,
                     val_batches=list(classification_batches(self.val_ds, tok, 128, max_length=ml)),
                     test_batches=list(classification_batches(self.test_ds, tok, 128, max_length=ml)), accuracy=True)


def _load_hf_dataset(o):
    """``(train, validation, test)``: named splits where the dataset has them, else stratified carve-outs of
    the train split (test first, then validation), all disjoint."""
    import os

    import datasets

    src = o["dataset"]
    if src.endswith((".csv", ".json", ".jsonl")):
        ds = datasets.load_dataset("csv" if src.endswith(".csv") else "json", data_files=src)
    elif os.path.isdir(src) and os.path.exists(f"{src}/dataset_info.json"):
        ds = datasets.load_from_disk(src)
    else:
        ds = datasets.load_dataset(src)

    def named(d):
        return d.rename_columns({c: n for c, n in ((o["text_column"], "text"), (o["label_column"], "label")) if c != n})

    train = named(ds[o["train_split"]] if isinstance(ds, datasets.DatasetDict) else ds)
    if not isinstance(train.features["label"], datasets.ClassLabel):
        train = train.class_encode_column("label")
    parts = {}
    for which in ("test", "val"):  # test carved first, so a given test set never depends on n_val
        split = o.get(f"{which}_split")
        if split and isinstance(ds, datasets.DatasetDict):
            parts[which] = named(ds[split]).cast_column("label", train.features["label"])
        else:
            cut = train.train_test_split(test_size=min(o[f"n_{which}"], len(train) // 5), seed=o["split_seed"],
                                         stratify_by_column="label")
            train, parts[which] = cut["train"], cut["test"]
    if o.get("n_train"):
        train = train.select(range(min(o["n_train"], len(train))))
    val, test = (parts[w].select(range(min(o[f"n_{w}"], len(parts[w])))) for w in ("val", "test"))
    return train, val, test


def make_task(task: str, options: dict[str, Any]):
    o = {**DEFAULTS[task], **options}
    if task == "wordnet-supersense":
        from lowrank.data.offline import load_minilm_classifier
        from lowrank.data.wordnet import supersense_train_val_test

        splits = supersense_train_val_test(n_train=o["n_train"], n_val=o["n_val"], n_test=o["n_test"],
                                           seed=o["split_seed"])
        return _TextTask(lambda n: load_minilm_classifier(n), *splits, o)
    if task == "hf-text-classification":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        splits = _load_hf_dataset(o)

        def load_model(n):
            model = AutoModelForSequenceClassification.from_pretrained(o["model"], num_labels=n)
            return model, AutoTokenizer.from_pretrained(o["model"])
        return _TextTask(load_model, *splits, o)
    return _Synthetic(o)


@dataclass
class _Out:
    loss: torch.Tensor
    logits: torch.Tensor


class _MLP(nn.Module):
    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x, y=None):
        out = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        return _Out(loss=None if y is None else (out - y).pow(2).mean(), logits=out)


class _Synthetic:
    """Pretrained ``f0``; target ``f*`` = ``f0`` with ``W_l + shift * U_l V_l^T / sqrt(k)`` (rank ``k``) on both layers."""

    def __init__(self, o):
        self.o = o
        g = torch.Generator().manual_seed(o["data_seed"])
        self.base = _MLP(o["d_in"], o["hidden"], o["d_out"])
        with torch.no_grad():
            for lin in (self.base.fc1, self.base.fc2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
                lin.bias.zero_()
        self.teacher = _MLP(o["d_in"], o["hidden"], o["d_out"])
        self.teacher.load_state_dict(self.base.state_dict())
        k = o["true_rank"]
        with torch.no_grad():
            for lin in (self.teacher.fc1, self.teacher.fc2):
                m, n = lin.weight.shape
                U, V = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
                lin.weight.add_(o["shift"] * U @ V.T / math.sqrt(k * n))
        self.val_x = torch.randn(o["n_val"], o["d_in"], generator=g)
        self.test_x = torch.randn(o["n_test"], o["d_in"], generator=g)

    def _batch(self, x):
        with torch.no_grad():
            return {"x": x, "y": self.teacher(x).logits}

    def build(self, seed: int, batch_size: int) -> Built:
        model = _MLP(self.o["d_in"], self.o["hidden"], self.o["d_out"])
        model.load_state_dict(self.base.state_dict())
        g = torch.Generator().manual_seed(seed)

        def stream():
            while True:
                yield self._batch(torch.randn(batch_size, self.o["d_in"], generator=g))
        gi = torch.Generator().manual_seed(seed + 10_000)
        init = [self._batch(torch.randn(batch_size, self.o["d_in"], generator=gi)) for _ in range(self.o["init_batches"])]
        return Built(model=model, targets=["fc1", "fc2"], head=[], train=stream(), init_batches=init,
                     val_batches=[self._batch(x) for x in self.val_x.split(256)],
                     test_batches=[self._batch(x) for x in self.test_x.split(256)], accuracy=False)
