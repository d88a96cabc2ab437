"""``lowrank ablate``: run an ablation sweep from a TOML config or a bundled preset, resuming, then print and
write its summary.

    lowrank ablate demo                                  # a bundled preset, by name (lowrank presets)
    lowrank ablate mine.toml --summary-only [--json]     # a config file

(``python -m lowrank_ablation ablate ...`` is the same command where the console script is not on PATH.)

Under ``torchrun --nproc-per-node N`` every run is data-parallel (DDP; see
``lowrank_ablation.run``) and rank 0 alone writes results and the summary.

Every field is validated before any training. Each finished run appends one JSON line to the
sweep's results file; rerunning skips finished runs (resume after a crash or Ctrl-C). A run whose
loss becomes non-finite is recorded as diverged and the sweep goes on. With ``lrs = "search"`` or
``"transfer"`` the runs are planned from the finished ones (``lowrank_ablation.search``):
learning rates are chosen on the validation split, the tables report the test split. The summary
(markdown tables with 95% intervals and paired verdicts, PNG plots) is written next to the results
file; ``--json`` prints it as one JSON object per arm and rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lowrank_ablation import config as config_mod
from lowrank_ablation import presets, transfer
from lowrank_ablation.run import append_record, check_arms, read_records, train_one
from lowrank_ablation.search import plan_sweep
from lowrank_ablation.summary import summarize
from lowrank_ablation.tasks import make_task


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a sweep config file, or a bundled preset's name (lowrank presets lists them)")
    p.add_argument("--summary-only", action="store_true", help="do not train; summarize the results file")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object per arm and rank")
    p.add_argument("--results", default=None, help="override the config's results path")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(resolve(args.config))
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
                todo = next_runs(plans, done)
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


def next_runs(plans: list, done: dict) -> list:
    """Every pending search run, else every pending final run (:func:`fewest_seeds_first`)."""
    return [r for p in plans for r in p.pending_search] or fewest_seeds_first(
        [r for p in plans for r in p.pending_final], done)


def fewest_seeds_first(todo: list, done: dict) -> list:
    """Final runs ordered by how many runs their arm already has at its rate (a stable sort): a sweep stopped
    halfway leaves every arm with about as many seeds as the others, not the first arms complete and the last
    ones without any. The order changes when runs happen, never what they compute."""
    have = Counter((r["arm"], r["rank"], r["lr"]) for r in done.values())
    return sorted(todo, key=lambda r: have[(r["arm"], r["rank"], r["lr"])])


def resolve(config: str) -> Path:
    """A config argument as a file: an existing path as given, else a bundled preset's name (``demo``,
    ``paper/t5-glue``); neither is a ``ValueError`` that lists the presets."""
    if Path(config).is_file():
        return Path(config)
    name = config[: -len(".toml")] if config.endswith(".toml") else config
    if name in presets.names():
        return presets.path(name)
    raise ValueError(f"{config}: no such config file, and no bundled preset of that name; the presets are "
                     f"{presets.names()} (lowrank copy NAME mine.toml writes one to edit)")


def _agree(record):
    """Under torchrun every rank plans from rank 0's record, so all ranks take the same decisions."""
    if not dist.is_initialized():
        return record
    box = [record]
    dist.broadcast_object_list(box, src=0)
    return box[0]
