"""Run an ablation sweep from a TOML config, resuming, then print and write its summary.

    python -m experiments.ablate experiments/configs/demo.toml
    python -m experiments.ablate experiments/configs/paper-ablation.toml --summary-only

Under ``torchrun --nproc-per-node N`` every run is data-parallel (DDP; see
``experiments/ablation/run.py``) and rank 0 alone writes results and the summary.

Every field is validated before any training. Each finished run appends one JSON line to the
sweep's results file; rerunning skips finished runs (resume after a crash or Ctrl-C). A run whose
loss becomes non-finite is recorded as diverged and the sweep goes on. The summary (markdown
table, PNG plots) is written next to the results file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from experiments.ablation import config as config_mod
from experiments.ablation.run import append_record, read_records, train_one
from experiments.ablation.summary import summarize
from experiments.ablation.tasks import make_task


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a sweep config (experiments/configs/*.toml)")
    p.add_argument("--summary-only", action="store_true", help="do not train; summarize the results file")
    p.add_argument("--results", default=None, help="override the config's results path")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = Path(args.results or cfg.sweep.results)
    runs = cfg.runs()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if launched:  # torchrun
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    try:
        if not args.summary_only:
            done = {r["key"] for r in read_records(results)}  # every rank reads the same file: same to-do list
            todo = [r for r in runs if r["key"] not in done]
            if rank0:
                print(f"{cfg.sweep.name}: {len(runs)} runs, {len(runs) - len(todo)} already in {results}, "
                      f"{len(todo)} to run")
            if todo:
                task = make_task(cfg.sweep.task, cfg.task)
                try:
                    for spec in tqdm(todo, desc=f"sweep {cfg.sweep.name}", disable=args.no_progress or not rank0):
                        record = train_one(task, spec, progress=not args.no_progress)
                        if rank0:
                            append_record(results, record)
                except KeyboardInterrupt:
                    print("\ninterrupted: finished runs are saved; rerun the same command to resume", file=sys.stderr)
                    return 130
        if dist.is_initialized():
            dist.barrier()
    finally:
        if launched:
            dist.destroy_process_group()
    if not rank0:
        return 0
    keys = {r["key"] for r in runs}
    records = [r for r in read_records(results) if r["key"] in keys]
    print(summarize(records, results, cfg.sweep.reference, f"{cfg.sweep.name}: {cfg.command}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
