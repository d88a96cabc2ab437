"""Optimizer-step overhead of each preconditioner: vs plain AdamW, and vs PEFT's equivalents.

    python -m experiments.bench_optim [--repeats 50] [--rank 8] [--batch-size 32]

MiniLM + a 41-way head, LoRA r=8 on all 37 linear layers (query, key, value, dense), gradients
from one real WordNet batch. Only ``optimizer.step()`` is timed: before every timed step the
same gradients are restored (untimed), so every step does the same work. Arms are interleaved
round-robin in one process so machine noise hits all alike; medians are printed.

1. Each registered preconditioner with AdamW as the base (``PreconditionedOptimizer``) vs plain
   ``torch.optim.AdamW`` on the same parameters: ratio = median step time / AdamW's. The
   ``check_finite=False`` arms show the wrapper's cost without its per-step non-finite check.
2. vs PEFT 0.21 on a PEFT model with the same adapters: ``create_riemannian_optimizer``
   (lowrank ``riemannian``), ``create_loraplus_optimizer`` (``lora_plus``),
   ``create_lorafa_optimizer`` (``lora_fa``); ratio = lowrank / PEFT.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import lowrank
from lowrank_ablation.data.batches import classification_batches
from lowrank_ablation.data.minilm import load_minilm_classifier
from lowrank_ablation.data.wordnet import supersense_splits
from lowrank.optim import PreconditionedOptimizer

TARGETS = ["query", "key", "value", "dense"]


class Arm:
    """A model, an optimizer and the saved gradients to restore before each timed step."""

    def __init__(self, model, opt, batch):
        self.model, self.opt = model, opt
        model.train()
        for _ in range(2):  # two real steps first, so B != 0 as during training
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        self.params = [p for p in model.parameters() if p.grad is not None]
        self.grads = [p.grad.clone() for p in self.params]
        self.times: list[float] = []

    def step(self):
        with torch.no_grad():
            for p, g in zip(self.params, self.grads):
                p.grad.copy_(g)
        t0 = time.perf_counter()
        self.opt.step()
        self.times.append(time.perf_counter() - t0)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def lowrank_model(n, rank, alpha):
    model, tok = load_minilm_classifier(n)
    lowrank.inject(model, lowrank.LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS, trainable=["classifier"]),
                   progress=False)
    return model, tok


def peft_model(n, rank, alpha):
    import peft

    model, _ = load_minilm_classifier(n)
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                                                      modules_to_save=["classifier"], lora_dropout=0.0))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args(argv)
    import peft
    from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer, create_riemannian_optimizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="lora_pro with")
    train, _ = supersense_splits(n_train=4 * args.batch_size, n_eval=100)
    n = train.features["label"].num_classes
    _, tok = load_minilm_classifier(n)
    batch = next(iter(classification_batches(train, tok, args.batch_size, shuffle=True, seed=0)))
    print(f"# bench_optim: lowrank {lowrank.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"r={args.rank}, {args.repeats} timed steps per arm")

    arms: dict[str, Arm] = {}
    m, _ = lowrank_model(n, args.rank, args.alpha)
    arms["torch AdamW"] = Arm(m, torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=args.lr), batch)
    for name in lowrank.list_preconditioners():
        m, _ = lowrank_model(n, args.rank, args.alpha)
        arms[f"lowrank adamw+{name}"] = Arm(m, PreconditionedOptimizer(m, "adamw", name, lr=args.lr), batch)
    m, _ = lowrank_model(n, args.rank, args.alpha)  # LoRA-RITE as the paper runs it: its own update, no Adam
    arms["lowrank sgd+lora_rite (the method)"] = Arm(m, PreconditionedOptimizer(m, "sgd", "lora_rite", lr=args.lr), batch)
    for name in ("identity", "lora_plus"):
        m, _ = lowrank_model(n, args.rank, args.alpha)
        arms[f"lowrank adamw+{name} check_finite=False"] = Arm(
            m, PreconditionedOptimizer(m, "adamw", name, lr=args.lr, check_finite=False), batch)
    pm = peft_model(n, args.rank, args.alpha)
    arms["peft riemannian"] = Arm(pm, create_riemannian_optimizer(pm, torch.optim.AdamW, lr=args.lr, reg=1e-6), batch)
    pm = peft_model(n, args.rank, args.alpha)
    arms["peft loraplus"] = Arm(pm, create_loraplus_optimizer(pm, torch.optim.AdamW, lr=args.lr,
                                                             loraplus_lr_ratio=16), batch)
    pm = peft_model(n, args.rank, args.alpha)
    arms["peft lorafa"] = Arm(pm, create_lorafa_optimizer(pm, r=args.rank, lora_alpha=int(args.alpha), lr=args.lr),
                              batch)
    for i in range(args.repeats):
        order = list(arms.values())
        for arm in (order if i % 2 == 0 else order[::-1]):
            arm.step()

    base = arms["torch AdamW"].median
    print("\n## 1. Step time vs plain AdamW (same parameters)")
    print("| optimizer | median step (ms) | ratio vs AdamW |\n|---|---|---|")
    for k, arm in arms.items():
        if k.startswith("peft"):
            continue
        print(f"| {k} | {arm.median * 1e3:.2f} | {arm.median / base:.2f} |")
    print("\n## 2. vs PEFT (same adapters, AdamW base)")
    print("| method | lowrank (ms) | PEFT (ms) | ratio lowrank/PEFT |\n|---|---|---|---|")
    for ours, theirs in (("riemannian", "peft riemannian"), ("lora_plus", "peft loraplus"),
                         ("lora_plus check_finite=False", "peft loraplus"), ("lora_fa", "peft lorafa")):
        a, b = arms[f"lowrank adamw+{ours}"].median, arms[theirs].median
        print(f"| {ours} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
