"""4-bit (bitsandbytes NF4) bases on the offline SmolLM2-135M: init time against the float32 base, and LoftQ.

    python -m experiments.bench_quant [--repeats 3] [--only time|loftq]

1. Init time, 4-bit / float32: ``inject`` r=8 on all seven projections of the 30 blocks (210 layers) of the
   model loaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4)`` against the same model in float32, for
   ``pissa`` (an SVD of every weight and a quantized residual), ``lora_ga`` (a gradient pass through the 4-bit
   forward, 4 batches of 16 sequences) and ``kaiming``; each repeat in a fresh process, the order alternating;
   median wall time of the ``inject`` call (target: 4-bit <= 1.2x float32).
2. Weight error on the quantized base, per layer, relative to plain NF4's ``||W0 - deq(quant(W0))||_F``:
   ``||W0 - deq(Q) - s B A||_F`` for ``loftq`` (T = 1, 2; the base quantized with ``quantize_base``) and
   for PiSSA's quantized residual (QPiSSA); median and max over the 210 layers (``W0``: the float32 weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import lowrank
from lowrank_ablation import presets

from .bench_init import run_arms

RANK = 8


def _model(bits: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lowrank_ablation.data.smollm2 import smollm2_path

    kw = {}
    if bits == 4:
        kw = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32, **kw).eval()


def _config(init: str, **opts) -> lowrank.LoRAConfig:
    from lowrank_ablation.tasks.causal_lm import PROJECTIONS

    opts = {"progress": False, **opts} if init == "lora_ga" else opts
    return lowrank.LoRAConfig(rank=RANK, alpha=16, scaling="rslora", targets=PROJECTIONS, init=init,
                              init_options=opts)


def _batches(n: int = 4, size: int = 16):
    from lowrank_ablation import make_task
    from lowrank_ablation.config import load

    task = make_task("causal-lm", {**load(presets.path("lm-ablation")).task,
                                   "n_train": 64, "n_val": 1, "n_test": 1})
    stream = task.build(0, size).train
    return [next(stream) for _ in range(n)]


def _time_worker(arm, init, queue):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = _model(4 if arm == "4-bit" else 32)
    data = _batches() if init == "lora_ga" else None
    t0 = time.perf_counter()
    lowrank.inject(model, _config(init), data=data, progress=False)
    queue.put((arm, time.perf_counter() - t0))


def bench_time(repeats: int) -> None:
    print(f"\n## 1. Init time on SmolLM2-135M (210 layers, r={RANK}), 4-bit NF4 vs float32 base, {repeats} repeats "
          "(fresh processes, alternating)")
    print("| init | float32 (s) | 4-bit (s) | 4-bit / float32 |\n|---|---|---|---|")
    for init in ("kaiming", "pissa", "lora_ga"):
        res = run_arms(_time_worker, ["float32", "4-bit"], (init,), repeats)
        med = {k: statistics.median(s for (s,) in v) for k, v in res.items()}
        print(f"| {init} | {med['float32']:.2f} | {med['4-bit']:.2f} | {med['4-bit'] / med['float32']:.3f} |")


def _errors(model, W0) -> list[float]:
    from lowrank.plan import adapted_layers
    from lowrank.quant import dequantized, nf4_roundtrip

    out = []
    for name, layer in adapted_layers(model):
        w = W0[name]
        approx = dequantized(layer.base_layer).float() + layer.delta_weight().detach()
        out.append(float(torch.linalg.matrix_norm(w - approx) / torch.linalg.matrix_norm(w - nf4_roundtrip(w))))
    return out


def bench_loftq() -> None:
    from lowrank import quantize_base

    print(f"\n## 2. ||W0 - deq(Q) - s B A|| / ||W0 - deq(quant(W0))|| per layer (210 layers, r={RANK}); "
          "below 1: better than plain NF4")
    print("| method | median | max | layers below 1 | init time (s) |\n|---|---|---|---|---|")
    base = _model(32)
    W0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    arms = [("loftq T=1", "loftq", {"num_iter": 1}), ("loftq T=2", "loftq", {"num_iter": 2}),
            ("pissa (quantized residual)", "pissa", {})]
    for label, init, opts in arms:
        model = _model(32)
        cfg = _config(init, **opts)
        t0 = time.perf_counter()
        lowrank.inject(model, cfg, progress=False)
        seconds = time.perf_counter() - t0
        quantize_base(model)
        e = _errors(model, W0)
        print(f"| {label} | {statistics.median(e):.3f} | {max(e):.3f} | {sum(x < 1 for x in e)}/{len(e)} | "
              f"{seconds:.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["time", "loftq"], default=None)
    args = p.parse_args(argv)
    import bitsandbytes

    print(f"# bench_quant: lowrank {lowrank.__version__}, bitsandbytes {bitsandbytes.__version__}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs")
    if args.only in (None, "time"):
        bench_time(args.repeats)
    if args.only in (None, "loftq"):
        bench_loftq()


if __name__ == "__main__":
    main()
