"""Per-layer first-step alignment of several initializers on a real model and real data.

    python -m lowrank.theory.report                                  # offline MiniLM + WordNet
    python -m lowrank.theory.report --inits lora_ga,pissa,kaiming,eva,corda,gora --rank 8 --batches 4 --out out/theory
    python -m lowrank.theory.report --model PATH --targets query,value  # any local HF classifier

The gradient ``G`` of every target layer is estimated once at the pretrained weights, on WordNet
definition -> supersense batches (``lowrank.data.wordnet``), and each initializer's first step is
compared with it (``lowrank.theory.alignment``): relative error ``min_c ||G - c D|| / ||G||``, its
Eckart-Young floor for rank ``2r``, and the excess over the floor (0 = LoRA-GA's theorem). Every
arm uses rsLoRA scaling; angles do not depend on ``s``. Writes ``alignment.md`` and ``alignment.csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import lowrank
from .alignment import compare


def summarize(results: dict[str, dict[str, "lowrank.theory.Alignment"]]) -> str:
    lines = ["| init | rel. error (median) | floor (median) | excess over floor (median / max) | cosine (median) | "
             "layers at the floor (excess < 1e-3) |", "|---|---|---|---|---|---|"]
    for label, per_layer in results.items():
        al = list(per_layer.values())
        ex = [a.excess for a in al]
        lines.append(f"| {label} | {statistics.median(a.rel_error for a in al):.4f} | "
                     f"{statistics.median(a.floor for a in al):.4f} | {statistics.median(ex):.2e} / {max(ex):.2e} | "
                     f"{statistics.median(a.cosine for a in al):.4f} | {sum(e < 1e-3 for e in ex)}/{len(ex)} |")
    return "\n".join(lines)


def per_layer(results, G, rank: int) -> str:
    """Per layer: the rank-``2 rank`` floor and each arm's error; an arm whose initializer allocated this
    layer another rank (EVA, GoRA) shows it, ``(r=k)``: its floor is that of ``2k``."""
    import torch

    labels = list(results)
    layers = list(next(iter(results.values())))
    head = f"| layer | floor (rank {2 * rank}) | " + " | ".join(f"{lab} error" for lab in labels) + " |"
    lines = [head, "|---|---|" + "---|" * len(labels)]
    for name in layers:
        S2 = torch.linalg.svdvals(G[name].double()).square()
        floor = (S2[2 * rank:].sum() / S2.sum()).sqrt().item() if S2.sum() > 0 else 0.0
        cells = " | ".join(f"{results[lab][name].rel_error:.4f}"
                           + (f" (r={results[lab][name].rank})" if results[lab][name].rank != rank else "")
                           for lab in labels)
        lines.append(f"| {name} | {floor:.4f} | {cells} |")
    return "\n".join(lines)


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

    from ..data.batches import classification_batches
    from ..data.offline import load_minilm_classifier
    from ..data.wordnet import supersense_splits

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
