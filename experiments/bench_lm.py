"""Decoder-LM benchmarks on the offline SmolLM2-135M with the ``lm-ablation`` preset's task.

    python -m experiments.bench_lm [--repeats 3] [--only init|eval]

1. LoRA-GA init (r=8, rsLoRA, all seven projections of the 30 blocks: 210 layers, 4 batches of 16
   sequences): lowrank ``inject(init="lora_ga")`` vs PEFT ``preprocess_loraga`` + ``get_peft_model`` on the
   same batches, each repeat in a fresh process, the order alternating; wall time and extra peak memory
   (RSS above the level before the init, sampled every 2 ms; on CUDA peak allocated bytes); ratios lowrank/PEFT.
2. Evaluation: ``exact_match`` and loss over the preset's 500 test prompts (greedy, batched, left-padded,
   KV cache), at eval batch sizes 32 / 64 / 128; seconds and prompts per second (target: under 180 s here).

The training step against PEFT's on this model is ``python -m experiments.bench_step --model smollm2``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import lowrank
from lowrank_ablation import presets

from lowrank_ablation.memory import PeakMemory
from .bench_init import peft_lora_ga, run_arms, time_memory_table

PRESET = presets.path("lm-ablation")


def _task(**overrides):
    from lowrank_ablation import make_task
    from lowrank_ablation.config import load

    return make_task("causal-lm", {**load(PRESET).task, **overrides})


def _model():
    from transformers import AutoModelForCausalLM

    from lowrank_ablation.data.smollm2 import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()


def _lowrank(model, batches, rank, alpha):
    from lowrank_ablation.tasks.causal_lm import PROJECTIONS

    cfg = lowrank.LoRAConfig(rank=rank, alpha=alpha, scaling="rslora", targets=PROJECTIONS, init="lora_ga",
                             init_options={"progress": False})
    return lowrank.inject(model, cfg, data=batches, progress=False)


def _peft(model, batches, rank, alpha):
    from lowrank_ablation.tasks.causal_lm import PROJECTIONS

    return peft_lora_ga(model, batches, rank, alpha, targets=PROJECTIONS)


def _init_worker(arm, rank, alpha, n_batches, batch_size, queue):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    task = _task(n_train=max(n_batches * batch_size, 64), n_val=1, n_test=1)
    stream = task.build(0, batch_size).train
    batches = [next(stream) for _ in range(n_batches)]
    model = _model()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        {"lowrank": _lowrank, "peft": _peft}[arm](model, batches, rank, alpha)
        seconds = time.perf_counter() - t0
    queue.put((arm, seconds, mem.extra))


def bench_init(args) -> None:
    arms = ["lowrank", "peft"]
    res = run_arms(_init_worker, arms, (args.rank, args.alpha, args.batches, args.batch_size), args.repeats)
    time_memory_table(f"1. LoRA-GA init on SmolLM2-135M (210 layers), {args.batches} batches x {args.batch_size}, "
                      f"r={args.rank}, {args.repeats} repeats (fresh processes)", res, "peft",
                      memory="extra peak memory (MiB)")


def bench_eval(args) -> None:
    print("\n## 2. Evaluation: exact match + loss over the preset's test prompts (greedy, KV cache)")
    print("| eval batch size | prompts | time (s) | prompts/s | exact match (base model) |\n|---|---|---|---|---|")
    for bs in (32, 64, 128):
        task = _task(n_train=64, n_val=1, eval_batch_size=bs)
        model = _model()
        batches = task.build(0, 16).test_batches
        n = sum(len(b["answers"]) for b in batches)
        t0 = time.perf_counter()
        out = task.evaluate(model, batches)
        dt = time.perf_counter() - t0
        print(f"| {bs} | {n} | {dt:.1f} | {n / dt:.1f} | {out['exact_match']:.3f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--only", choices=["init", "eval"], default=None)
    args = p.parse_args(argv)
    import peft

    print(f"# bench_lm: lowrank {lowrank.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    if args.only in (None, "init"):
        bench_init(args)
    if args.only in (None, "eval"):
        bench_eval(args)


if __name__ == "__main__":
    main()
