"""5. The statistics pass (``--only stats``): forward-only statistics against the gradient estimate."""

from __future__ import annotations

import statistics
import time

from .harness import ENCODER, load_model


def bench_stats(args, n, batches):
    from lowrank.init.collect import collect_statistics

    model, _ = load_model(n)
    import re

    modules = {k: m for k, m in model.named_modules() if re.fullmatch(ENCODER, k)}
    times = {need: [] for need in ("gradient", "covariance", "input_svd")}
    for i in range(args.repeats):
        for need in (times if i % 2 == 0 else list(times)[::-1]):
            t0 = time.perf_counter()
            collect_statistics(model, modules, batches, None, (need,), progress=False)
            times[need].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n## 5. Statistics pass, {len(modules)} layers, {args.batches} batches x {args.batch_size}, "
          f"{args.repeats} repeats (median)")
    print("| need | time (s) | ratio to the gradient pass |\n|---|---|---|")
    for k, t in med.items():
        print(f"| {k} | {t:.2f} | {t / med['gradient']:.3f} |")
