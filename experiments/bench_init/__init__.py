"""The initialization benchmarks, lowrank against PEFT: a shared harness (``harness.py``) and one file per
benchmark; ``python -m experiments.bench_init`` runs them (``cli.py`` lists them and their flags)."""

from .harness import peft_lora_ga, run_arms, time_memory_table  # noqa: F401 - used by bench_lm, bench_quant
