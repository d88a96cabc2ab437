"""``lrs = "transfer"``: each non-reference arm's predicted rate (``lowrank.theory.transfer_lr``), measured
on the task's model and init batches with the first search seed, cached next to the results file
(``<results stem>_transfer.json``) so that resuming and ``--summary-only`` reuse it."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

import lowrank
from lowrank.theory.transfer import DEFAULT_RULE, Arm as TheoryArm, FullFineTune, transfer_lr

from .config import Arm, Config


def path_for(results: Path) -> Path:
    return results.with_name(results.stem + "_transfer.json")


def entry_key(cfg: Config, arm: Arm, rank: int | None, reference_lr: float, rule: str = DEFAULT_RULE) -> str:
    """What a prediction depends on: both arms, the rank, the task, the reference's rate, the rule."""
    ref = next(a for a in cfg.arms if a.name == cfg.sweep.reference)
    what = {"arm": arm.identity(), "reference": ref.identity(), "rank": rank, "reference_lr": reference_lr,
            "task": cfg.sweep.task, "task_options": cfg.task, "alpha": cfg.sweep.alpha, "seed": cfg.search.seeds[0],
            "batch_size": cfg.sweep.batch_size, "rule": rule}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load(results: Path) -> dict[str, dict[str, Any]]:
    p = path_for(Path(results))
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"{p}: not valid JSON; the transferred rates will be measured again", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def _theory_arm(arm: Arm, rank: int | None, cfg: Config, built) -> TheoryArm:
    if arm.full_finetune:
        return TheoryArm(FullFineTune(frozen=tuple(built.head)))
    lora = lowrank.LoRAConfig(rank=rank, alpha=cfg.sweep.alpha, scaling=arm.scaling, targets=built.targets,
                              init=arm.init, init_options=arm.init_options, seed=cfg.search.seeds[0])
    return TheoryArm(lora, preconditioner=arm.preconditioner, preconditioner_options=arm.preconditioner_options)


def predict_waiting(cfg: Config, task, plans, store: dict[str, dict[str, Any]], results: Path, write: bool) -> bool:
    """Measure the predicted rate of every arm that waits for one; True if any was added to ``store``."""
    ref_plans = {p.rank: p for p in plans if p.arm == cfg.sweep.reference}
    added = False
    for p in plans:
        if not p.waiting:
            continue
        ref = ref_plans.get(p.rank) or next(iter(ref_plans.values()))
        if not ref.selected:
            continue
        arm = next(a for a in cfg.arms if a.name == p.arm)
        ref_arm = next(a for a in cfg.arms if a.name == cfg.sweep.reference)
        seed = cfg.search.seeds[0]
        built = task.build(seed, cfg.sweep.batch_size)
        lr = transfer_lr(lambda: task.build(seed, cfg.sweep.batch_size).model, _theory_arm(ref_arm, ref.rank, cfg, built),
                         ref.chosen, {p.arm: _theory_arm(arm, p.rank, cfg, built)}, built.init_batches)[p.arm]
        if dist.is_initialized():  # every rank plans with rank 0's number
            box = [lr]
            dist.broadcast_object_list(box, src=0)
            lr = box[0]
        store[entry_key(cfg, arm, p.rank, ref.chosen)] = {"arm": p.arm, "rank": p.rank, "reference": ref.arm,
                                                           "reference_lr": ref.chosen, "rule": DEFAULT_RULE,
                                                           "predicted_lr": lr}
        print(f"{cfg.sweep.name}: transfer {cfg.sweep.reference} lr {ref.chosen:g} -> {p.arm} "
              f"(r={p.rank}) lr {lr:.3g}", file=sys.stderr)
        added = True
        if write:
            target = path_for(Path(results))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(store, indent=1, sort_keys=True))
            os.replace(tmp, target)
    return added
