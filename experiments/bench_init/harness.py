"""The shared harness of the initialization benchmarks: the offline MiniLM and WordNet batches, LoRA-GA through
lowrank and through PEFT, fresh-subprocess arms with their peak memory, and the tables."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

import torch

import lowrank
from lowrank_ablation.data.batches import classification_batches
from lowrank_ablation.data.wordnet import supersense_splits

from lowrank_ablation.memory import PeakMemory


TARGETS = ["query", "key", "value", "dense"]


ENCODER = r"bert\.encoder\.layer\.\d+\..*(query|key|value|dense)"
"""The encoder's linear layers (the pooler's ``dense`` sees 2-D inputs, which PEFT's EVA cannot take)."""


def load_model(num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    from lowrank_ablation.data.minilm import minilm_path

    logging.set_verbosity_error()
    path = minilm_path()
    torch.manual_seed(0)  # the classifier head is new: seed it so every arm sees the same gradient
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def get_batches(n_batches: int, batch_size: int, seed: int = 1):
    train, _ = supersense_splits(n_train=n_batches * batch_size * 2, n_eval=100)
    n = train.features["label"].num_classes
    model, tok = load_model(n)
    return n, list(classification_batches(train, tok, batch_size, shuffle=True, seed=seed))[:n_batches]


def lowrank_lora_ga(model, batches, rank, alpha, svd="full", variant="paper"):
    cfg = lowrank.LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS, scaling="rslora", init="lora_ga",
                             init_options={"progress": False, "svd": svd, "variant": variant})
    lowrank.inject(model, cfg, data=batches, progress=False)
    return model


def peft_lora_ga(model, batches, rank, alpha, targets=TARGETS):
    """PEFT's LoRA-GA as its docs use it: ``preprocess_loraga`` on the batches, then ``get_peft_model``."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=True, lora_dropout=0.0,
                          init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig())

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    peft.tuners.lora.preprocess_loraga(model, cfg, train_step)
    return peft.get_peft_model(model, cfg)


def _init_worker(arm, rank, alpha, n_batches, batch_size, queue):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    n, batches = get_batches(n_batches, batch_size)
    model, _ = load_model(n)
    fn = {"lowrank": lowrank_lora_ga, "peft": peft_lora_ga,
          "lowrank randomized": lambda *a: lowrank_lora_ga(*a, svd="randomized")}[arm]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        fn(model, batches, rank, alpha)
        seconds = time.perf_counter() - t0
    queue.put((arm, seconds, mem.extra))


def run_arms(worker, arms, extra_args, repeats):
    """``{arm: [result[1:] per repeat]}``: each arm in a fresh spawned process per repeat, the order of the
    arms reversed on every other repeat; ``worker(arm, *extra_args, queue)`` puts ``(arm, ...)`` on the queue."""
    ctx = mp.get_context("spawn")
    results = {k: [] for k in arms}
    for i in range(repeats):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            q = ctx.Queue()
            p = ctx.Process(target=worker, args=(arm, *extra_args, q))
            p.start()
            res = q.get()
            p.join()
            results[arm].append(res[1:])
    return results


def time_memory_table(title: str, results: dict, peer: str, memory: str = "extra peak RSS (MiB)") -> None:
    """Print the median time and extra memory of each arm of ``run_arms`` results (``(seconds, bytes)`` per
    repeat) and each arm's ratio to ``peer``, measured side by side in the same run."""
    med = {k: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    print(f"\n## {title}")
    print(f"| | time (s) | {memory} |\n|---|---|---|")
    for k, (s, m) in med.items():
        print(f"| {k} | {s:.2f} | {m / 2**20:.0f} |")
    for k in (k for k in med if k != peer):
        print(f"| ratio {k}/{peer} | {med[k][0] / med[peer][0]:.3f} | {med[k][1] / med[peer][1]:.3f} |")


def _pairs_peft(model):
    """``{name: (A, B, s)}`` of a PEFT LoRA model, keyed by the base model's module names."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = (mod.lora_A["default"].weight.detach().double(), mod.lora_B["default"].weight.detach().double(),
                        mod.scaling["default"])
    return out


def _pairs_lowrank(model):
    return {n: (layer.A.detach().double(), layer.B.detach().double(), layer.scaling)
            for n, layer in lowrank.adapted_layers(model)}


def _one_batch(batches):
    """The batches as one, padded to the longest (the attention mask marks the padding)."""
    L = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda t: torch.nn.functional.pad(t, (0, L - t.shape[1]))  # noqa: E731
    return {"input_ids": torch.cat([pad(b["input_ids"]) for b in batches]),
            "attention_mask": torch.cat([pad(b["attention_mask"]) for b in batches]),
            "labels": torch.cat([b["labels"] for b in batches])}
