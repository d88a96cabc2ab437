"""6. Sketched LoRA-GA (``--only sketch``): error excess over the Eckart-Young floor and time, ``--draws``."""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

import lowrank

from .harness import TARGETS, get_batches, load_model


def _sketch_excess(n, batches, rank, alpha, arms):
    """Per arm, every layer's first-step excess over the Eckart-Young floor (against the dense ``G`` of the same
    batches), and the init time."""
    from lowrank.theory import alignment

    model, _ = load_model(n)
    modules = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and name.rsplit(".", 1)[-1] in TARGETS}
    G = lowrank.init.estimate_gradients(model, modules, batches, lowrank.default_loss, progress=False)
    out = {}
    for label, opts in arms.items():
        m, _ = load_model(n)
        cfg = lowrank.LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS, scaling="rslora", init="lora_ga",
                                 init_options={"progress": False, **opts})
        t0 = time.perf_counter()
        lowrank.inject(m, cfg, data=batches, progress=False)
        seconds = time.perf_counter() - t0
        layers = dict(lowrank.adapted_layers(m))
        out[label] = ([alignment(*layers[k].factors(), layers[k].scaling, G[k]) for k in G], seconds)
    return out


def bench_sketch_draws(args):
    """The default sketch on held-out draws of the batches: is its median excess a property of the default or of
    the one draw it was measured on?"""
    from lowrank.init.sketch import DEFAULT_PASSES

    arms = {f"sketch, {DEFAULT_PASSES} passes (default)": {"estimator": "sketch"},
            "sketch, 4 passes": {"estimator": "sketch", "passes": 4},
            f"sketch, {DEFAULT_PASSES} passes, krylov=True": {"estimator": "sketch", "krylov": True}}
    per_draw = {a: [] for a in arms}
    pooled = {a: [] for a in arms}
    n, pool = get_batches(args.batches * args.draws, args.batch_size, seed=2)
    for d in tqdm(range(args.draws), desc="draws"):
        batches = pool[d * args.batches:(d + 1) * args.batches]
        for label, (al, _) in _sketch_excess(n, batches, args.rank, args.alpha, arms).items():
            ex = [a.excess for a in al]
            per_draw[label].append(statistics.median(ex))
            pooled[label] += ex
    print(f"\n## 6b. Sketched LoRA-GA on {args.draws} held-out draws (disjoint, shuffle seed 2) of "
          f"{args.batches} x {args.batch_size} examples, r={args.rank}, width {8 * args.rank}")
    print("| estimator | excess median per draw | median over (draw, layer) | max over draws of the median | max |")
    print("|---|---|---|---|---|")
    for label in arms:
        print(f"| {label} | {', '.join(f'{v:.1e}' for v in per_draw[label])} | {statistics.median(pooled[label]):.2e} "
              f"| {max(per_draw[label]):.2e} | {max(pooled[label]):.2e} |")


def bench_sketch(args, n, batches):
    from lowrank.init.sketch import DEFAULT_PASSES

    arms = {"dense": {}} | {f"sketch, {p} pass{'es' if p > 1 else ''}": {"estimator": "sketch", "passes": p}
                            for p in range(1, 5)}
    arms |= {f"sketch, {p} passes, krylov=True": {"estimator": "sketch", "passes": p, "krylov": True} for p in (3, 4)}
    results = _sketch_excess(n, batches, args.rank, args.alpha, arms)
    print(f"\n## 6. Sketched LoRA-GA, r={args.rank}, sketch width {8 * args.rank} (default), "
          f"{len(results['dense'][0])} layers, {args.batches} x {args.batch_size} examples; default passes = "
          f"{DEFAULT_PASSES}")
    print("| estimator | sin(step, G_2r) median / max | excess over floor median / max | init time (s) |")
    print("|---|---|---|---|")
    for label, (al, seconds) in results.items():
        sines = sorted(a.rel_error_2r for a in al)
        ex = sorted(a.excess for a in al)
        print(f"| {label} | {statistics.median(sines):.2e} / {sines[-1]:.2e} | {statistics.median(ex):.2e} / "
              f"{ex[-1]:.2e} | {seconds:.2f} |")
