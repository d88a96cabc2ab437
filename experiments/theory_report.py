"""Per-layer first-step alignment of several initializers on a real model and real data.

    python -m experiments.theory_report                                  # offline MiniLM + WordNet
    python -m experiments.theory_report --inits lora_ga,pissa,kaiming,eva,corda,gora --rank 8 --batches 4 --out out/theory
    python -m experiments.theory_report --model PATH --targets query,value  # any local HF classifier

The gradient ``G`` of every target layer is estimated once at the pretrained weights, on WordNet
definition -> supersense batches (``lowrank_ablation.data.wordnet``), and each initializer's first step is
compared with it (``lowrank.theory.alignment``): relative error ``min_c ||G - c D|| / ||G||``, its
Eckart-Young floor for rank ``2r``, and the excess over the floor (0 = LoRA-GA's theorem). Every
arm uses rsLoRA scaling; angles do not depend on ``s``. Writes ``alignment.md`` and ``alignment.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import lowrank
from lowrank.theory import compare
from lowrank.theory.tables import per_layer, summarize


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path of a sequence classifier (default: the offline MiniLM)")
    p.add_argument("--inits", default="lora_ga,pissa,kaiming,eva,corda,gora")
    p.add_argument("--targets", default="query,key,value,dense")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/theory")
    args = p.parse_args(argv)
    import torch
    from transformers.utils import logging

    from lowrank_ablation.data.batches import classification_batches
    from lowrank_ablation.data.minilm import load_minilm_classifier
    from lowrank_ablation.data.wordnet import supersense_splits

    logging.set_verbosity_error()
    inits = [s.strip() for s in args.inits.split(",") if s.strip()]
    configs = {name: lowrank.LoRAConfig(rank=args.rank, alpha=args.alpha, scaling="rslora",
                                        targets=[t.strip() for t in args.targets.split(",")], init=name, seed=args.seed,
                                        init_options={"progress": False} if lowrank.get_initializer(name).uses_data
                                        else {})
               for name in inits}  # validates every init name before any work
    train, _ = supersense_splits(n_train=args.batches * args.batch_size * 2, n_eval=100, seed=args.seed)
    num_labels = train.features["label"].num_classes

    def build():
        torch.manual_seed(args.seed)  # the new classifier head: the same for every arm
        if args.model is None:
            return load_minilm_classifier(num_labels)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        return (AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels).eval(),
                AutoTokenizer.from_pretrained(args.model))

    _, tok = build()
    data = list(classification_batches(train, tok, args.batch_size, shuffle=True, seed=args.seed))[: args.batches]
    results, G = compare(lambda: build()[0].eval(), configs, data)
    name = args.model or "offline MiniLM (all-MiniLM-L6-v2)"
    title = (f"# First-step alignment: {name}, WordNet supersense, r={args.rank}, {len(data)} x {args.batch_size} "
             f"examples, {len(G)} layers")
    text = "\n\n".join([title, "## Summary", summarize(results), "## Per layer (relative error; floor = Eckart-Young)",
                        per_layer(results, G, args.rank)])
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment.md").write_text(text + "\n")
    with open(out / "alignment.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["init", "layer", "rel_error", "floor", "excess", "cosine", "rel_error_2r", "zeta", "rank"])
        for label, per in results.items():
            for layer, a in per.items():
                w.writerow([label, layer, a.rel_error, a.floor, a.excess, a.cosine, a.rel_error_2r, a.zeta, a.rank])
    print(f"\nwrote {out / 'alignment.md'} and {out / 'alignment.csv'}")


if __name__ == "__main__":
    main()
