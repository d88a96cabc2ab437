"""3. First-step alignment of lowrank's and PEFT's ``lora_ga`` on the same gradient."""

from __future__ import annotations

import statistics

import torch

import lowrank

from .harness import TARGETS, _pairs_lowrank, _pairs_peft, load_model, lowrank_lora_ga, peft_lora_ga


def bench_alignment(args, n, batches):
    print(f"\n## 3. First-step alignment with G_2r on the same gradient (r={args.rank})")
    model, _ = load_model(n)
    modules = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and name.rsplit(".", 1)[-1] in TARGETS}
    G = lowrank.init.estimate_gradients(model, modules, batches, lowrank.default_loss, progress=False)
    arms = {
        "lowrank lora_ga": _pairs_lowrank(lowrank_lora_ga(load_model(n)[0], batches, args.rank, args.alpha)),
        "lowrank lora_ga svd=randomized": _pairs_lowrank(
            lowrank_lora_ga(load_model(n)[0], batches, args.rank, args.alpha, svd="randomized")),
        "peft lora_ga": _pairs_peft(peft_lora_ga(load_model(n)[0], batches, args.rank, args.alpha)),
        "lowrank lora_ga variant=peft": _pairs_lowrank(
            lowrank_lora_ga(load_model(n)[0], batches, args.rank, args.alpha, svd="auto", variant="peft")),
    }
    print("| | sin(angle(first step, G_2r)) median | max | sin(angle(first step, G)) median |\n|---|---|---|---|")
    for label, pairs in arms.items():
        sines, sines_full = [], []
        for name, (A, B, s) in pairs.items():
            g = G[name].double()
            U, S, Vh = torch.linalg.svd(g, full_matrices=False)
            g2r = (U[:, :2 * args.rank] * S[:2 * args.rank]) @ Vh[:2 * args.rank]
            step = s ** 2 * (B @ B.T @ g + g @ A.T @ A)
            for ref, acc in ((g2r, sines), (g, sines_full)):
                cos = (step * ref).sum() / (step.norm() * ref.norm())
                acc.append(float((1 - cos.clamp(max=1) ** 2).clamp(min=0).sqrt()))
        print(f"| {label} | {statistics.median(sines):.2e} | {max(sines):.2e} | {statistics.median(sines_full):.3f} |")
