"""1. LoRA-GA init: wall time and extra peak memory of the whole init phase, lowrank vs PEFT (``bench_init``
module docstring)."""

from __future__ import annotations

from .harness import _init_worker, run_arms, time_memory_table


def bench_lora_ga_init(args):
    arms = ["lowrank", "lowrank randomized", "peft"]
    results = run_arms(_init_worker, arms, (args.rank, args.alpha, args.batches, args.batch_size), args.repeats)
    time_memory_table("1. LoRA-GA init phase (gradient estimate + SVD + adapters), "
                      f"{args.batches} batches x {args.batch_size}, r={args.rank}, {args.repeats} repeats", results,
                      "peft")
