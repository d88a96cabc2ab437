"""Run an ablation sweep from a TOML config, resuming, then print and write its summary.

    python -m experiments.ablate experiments/configs/demo.toml
    python -m experiments.ablate experiments/configs/fair-ablation.toml --summary-only [--json]

Under ``torchrun --nproc-per-node N`` every run is data-parallel (DDP; see
``experiments/ablation/run.py``) and rank 0 alone writes results and the summary.

Every field is validated before any training. Each finished run appends one JSON line to the
sweep's results file; rerunning skips finished runs (resume after a crash or Ctrl-C). A run whose
loss becomes non-finite is recorded as diverged and the sweep goes on. With ``lrs = "search"`` or
``"transfer"`` the runs are planned from the finished ones (``experiments/ablation/search.py``):
learning rates are chosen on the validation split, the tables report the test split. The summary
(markdown tables with 95% intervals and paired verdicts, PNG plots) is written next to the results
file; ``--json`` prints it as one JSON object per arm and rank.
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
from experiments.ablation import transfer
from experiments.ablation.run import append_record, check_arms, read_records, train_one
from experiments.ablation.search import plan_sweep
from experiments.ablation.summary import summarize
from experiments.ablation.tasks import make_task


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a sweep config (experiments/configs/*.toml)")
    p.add_argument("--summary-only", action="store_true", help="do not train; summarize the results file")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object per arm and rank")
    p.add_argument("--results", default=None, help="override the config's results path")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = Path(args.results or cfg.sweep.results)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if launched:  # torchrun
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    done = {r["key"]: r for r in read_records(results, warn=rank0)}  # every rank reads the same file
    predictions = transfer.load(results)
    try:
        if not args.summary_only:
            if rank0:
                print(f"{cfg.sweep.name}: {len(done)} finished runs in {results}", file=sys.stderr)
            try:
                task = make_task(cfg.sweep.task, cfg.task)
                check_arms(cfg, task)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            while True:
                plans = plan_sweep(cfg, done, predictions)
                if any(p.waiting for p in plans):
                    if transfer.predict_waiting(cfg, task, plans, predictions, results, write=rank0):
                        continue
                todo = [r for p in plans for r in p.pending_search] or [r for p in plans for r in p.pending_final]
                if not todo:
                    break
                phase = todo[0]["phase"]
                try:
                    for spec in tqdm(todo, desc=f"{cfg.sweep.name} ({phase})", disable=args.no_progress or not rank0):
                        record = _agree(train_one(task, spec, progress=not args.no_progress))
                        if rank0:
                            append_record(results, record)
                        done[record["key"]] = record
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
    plans = plan_sweep(cfg, done, predictions)
    print(summarize(cfg, plans, done, results, as_json=args.json))
    return 0


def _agree(record):
    """Under torchrun every rank plans from rank 0's record, so all ranks take the same decisions."""
    if not dist.is_initialized():
        return record
    box = [record]
    dist.broadcast_object_list(box, src=0)
    return box[0]


if __name__ == "__main__":
    raise SystemExit(main())
