"""End-to-end demo on a real pretrained model and real data, offline.

    bash scripts/demo.sh                       # set up, then: python -m experiments.demo
    python -m experiments.demo --inits kaiming,pissa,lora_ga --steps 100   # the defaults

For each initializer: MiniLM (sentence-transformers/all-MiniLM-L6-v2) + a new 41-way head
classifies WordNet definitions into their supersense. LoRA (rsLoRA) on all 36 encoder linears
(query/key/value/dense, the pooler excluded), the head trained in full, AdamW: each initializer's
adapters at its own rate, the one ``fair-ablation``'s search chose for it
(``experiments/results/fair-ablation.jsonl``, replayed); ``--lr`` forces one shared rate instead
(a confounded comparison); the new head at ``--head-lr``. Prints a table (train loss, eval
loss/accuracy, time), saves each adapter, reloads it onto a fresh original model and checks the
outputs match bit for bit.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lowrank
from lowrank_ablation import presets
from lowrank_ablation.data.batches import classification_batches
from lowrank_ablation.data.minilm import load_minilm_classifier
from lowrank_ablation.data.wordnet import supersense_splits

TARGETS = r"encoder\..*\.(query|key|value|dense)"


@torch.no_grad()
def evaluate(model, batches) -> tuple[float, float]:
    model.eval()
    total, correct, loss = 0, 0, 0.0
    for b in batches:
        out = model(**b)
        loss += out.loss.item() * len(b["labels"])
        correct += (out.logits.argmax(-1) == b["labels"]).sum().item()
        total += len(b["labels"])
    return loss / total, correct / total


@functools.lru_cache(maxsize=1)
def tuned_rates() -> dict[str, float]:
    """``{initializer: rate}`` that fair-ablation's search chose, for its arms with the initializer's default
    options and no preconditioner (replayed from the committed results file)."""
    from lowrank_ablation.config import load
    from lowrank_ablation.run import read_records
    from lowrank_ablation.search import plan_sweep

    root = Path(__file__).resolve().parent
    cfg = load(presets.path("fair-ablation"))
    done = {r["key"]: r for r in read_records(root.parent / cfg.sweep.results)}
    chosen = {p.arm: p.chosen for p in plan_sweep(cfg, done) if p.selected}
    return {a.init: chosen[a.name] for a in cfg.arms if a.name in chosen and not a.full_finetune
            and a.preconditioner == "identity" and set(a.init_options) <= {"progress"}}


def run_arm(init: str, args, train, evaluation, num_labels: int) -> dict:
    model, tok = load_minilm_classifier(num_labels)
    cls = lowrank.get_initializer(init)
    cfg = lowrank.LoRAConfig(rank=args.rank, alpha=args.alpha, targets=TARGETS, trainable=["classifier"],
                             init=init, scaling="rslora", seed=args.seed)  # as in fair-ablation
    t0 = time.perf_counter()
    init_data = list(classification_batches(train, tok, args.batch_size, shuffle=True, seed=args.seed + 1000)
                     )[: args.init_batches] if cls.uses_data else None
    lowrank.inject(model, cfg, data=init_data)
    t_init = time.perf_counter() - t0
    print(f"[{init}] {lowrank.summary(model)} (init {t_init:.1f} s)")
    adapters = {id(p) for _, layer in lowrank.adapted_layers(model) for p in layer.adapter_parameters().values()}
    params = list(lowrank.trainable_parameters(model).values())
    lr = args.lr or tuned_rates()[init]
    print(f"[{init}] adapter learning rate {lr:g} ({'--lr' if args.lr else 'tuned by fair-ablation'})")
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) in adapters], "lr": lr},
                             {"params": [p for p in params if id(p) not in adapters], "lr": args.head_lr}])
    stream = classification_batches(train, tok, args.batch_size, shuffle=True, seed=args.seed, epochs=None)
    losses = []
    model.train()
    for _, batch in zip(tqdm(range(args.steps), desc=init, leave=False), stream):
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    eval_batches = list(classification_batches(evaluation, tok, 128))
    eval_loss, eval_acc = evaluate(model, eval_batches)
    elapsed = time.perf_counter() - t0

    out = Path(args.out) / init
    lowrank.save_adapter(model, out)
    fresh, _ = load_minilm_classifier(num_labels)
    lowrank.load_adapter(fresh, out).eval()
    with torch.no_grad():
        same = torch.equal(fresh(**eval_batches[0]).logits, model(**eval_batches[0]).logits)
    tail = losses[-10:]
    return {"init": init, "train_loss": sum(tail) / len(tail), "eval_loss": eval_loss, "eval_acc": eval_acc,
            "seconds": elapsed, "reload_identical": same}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inits", default="kaiming,pissa,lora_ga", help="comma-separated registered initializers")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="one adapter learning rate for every arm (default: each init's rate tuned by fair-ablation)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the new classifier head")
    p.add_argument("--init-batches", type=int, default=4, help="batches for data-driven initializers")
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/demo")
    args = p.parse_args(argv)
    inits = [s.strip() for s in args.inits.split(",") if s.strip()]
    for name in inits:
        lowrank.get_initializer(name)  # fail before any work on a typo
        if args.lr is None and name not in tuned_rates():
            raise SystemExit(f"fair-ablation has no tuned rate for {name!r} (it tunes {sorted(tuned_rates())}); "
                             "pass --lr")
    torch.manual_seed(args.seed)
    train, evaluation = supersense_splits(n_train=args.steps * args.batch_size, n_eval=args.n_eval, seed=args.seed)
    num_labels = train.features["label"].num_classes
    print(f"WordNet supersense: {len(train)} train / {len(evaluation)} eval definitions, {num_labels} classes")
    rows = [run_arm(init, args, train, evaluation, num_labels) for init in inits]
    print("\n| init | train loss (last 10) | eval loss | eval acc | time (s) | reload identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['init']} | {r['train_loss']:.3f} | {r['eval_loss']:.3f} | {r['eval_acc']:.3f} | "
              f"{r['seconds']:.0f} | {r['reload_identical']} |")
    if not all(r["reload_identical"] for r in rows):
        raise SystemExit("a reloaded adapter did not reproduce the fine-tuned model's outputs")


if __name__ == "__main__":
    main()
