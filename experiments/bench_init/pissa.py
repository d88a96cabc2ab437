"""2. Randomized PiSSA vs PEFT ``pissa_niter_4``: error against the exact truncation and time."""

from __future__ import annotations

import statistics
import time

import torch

import lowrank

from .harness import TARGETS, _pairs_lowrank, _pairs_peft, load_model


def bench_pissa(args, n):
    import peft

    print(f"\n## 2. PiSSA rank-{args.rank} part: randomized vs full SVD (all {len(TARGETS)} target kinds, "
          f"{args.repeats} repeats, time = whole init)")
    rows = {}
    arms = {
        "lowrank pissa full": lambda m: lowrank.inject(m, lowrank.LoRAConfig(rank=args.rank, alpha=args.alpha,
                                                                            targets=TARGETS, init="pissa"), progress=False),
        "lowrank pissa randomized": lambda m: lowrank.inject(m, lowrank.LoRAConfig(
            rank=args.rank, alpha=args.alpha, targets=TARGETS, init="pissa", init_options={"svd": "randomized"}),
            progress=False),
        "peft pissa_niter_4": lambda m: peft.get_peft_model(m, peft.LoraConfig(
            r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, init_lora_weights="pissa_niter_4")),
    }
    base, _ = load_model(n)
    W0 = {name: mod.weight.detach().double() for name, mod in base.named_modules() if isinstance(mod, torch.nn.Linear)
          and name.rsplit(".", 1)[-1] in TARGETS}
    truncs = {}
    for name, w in W0.items():
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        truncs[name] = ((U[:, :args.rank] * S[:args.rank]) @ Vh[:args.rank], (S[args.rank:] ** 2).sum().sqrt())
    times = {k: [] for k in arms}
    errs = {}
    for i in range(args.repeats):
        for k, fn in (arms.items() if i % 2 == 0 else reversed(list(arms.items()))):
            model, _ = load_model(n)
            t0 = time.perf_counter()
            model = fn(model)
            times[k].append(time.perf_counter() - t0)
            pairs = _pairs_peft(model) if k.startswith("peft") else _pairs_lowrank(model)
            e_part, e_ey = [], []
            for name, (A, B, s) in pairs.items():
                ref, floor = truncs[name]
                part = s * B @ A
                e_part.append(((part - ref).norm() / ref.norm()).item())
                e_ey.append(((W0[name] - part).norm() / floor - 1).item())
            errs[k] = (statistics.median(e_part), max(e_part), statistics.median(e_ey))
    print("| | rank-r part rel. error (median / max over layers) | Eckart-Young suboptimality (median) | time (s) |")
    print("|---|---|---|---|")
    for k in arms:
        e = errs[k]
        t = statistics.median(times[k])
        rows[k] = t
        print(f"| {k} | {e[0]:.4f} / {e[1]:.4f} | {e[2]:.2e} | {t:.3f} |")
    print(f"time ratio lowrank randomized / peft pissa_niter_4: {rows['lowrank pissa randomized'] / rows['peft pissa_niter_4']:.2f}")
