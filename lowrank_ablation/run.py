"""Train one run of a sweep and append its record (one JSON line, written atomically).

A record holds the run's spec (``Config.spec``: ``arm`` is the arm's name, ``arm_config`` its
settings, ``rank``, ``lr``, ``seed``, ``phase``, ``key``), ``status`` (``"ok"`` or ``"diverged"``),
the training loss curve, the validation curve ``eval``, and the final metrics ``val`` and ``test``
(the task's metrics, e.g. ``{"loss": ..., "exact_match": ...}``; ``None`` values for a diverged run), and, for a
task that returns them, the test split's per-example outcomes ``test_outcomes`` (``outcomes.py``).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import lowrank
from lowrank import distributed as dist_helpers
from lowrank.optim import PreconditionedOptimizer

from . import outcomes, records
from .memory import PeakMemory
from .records import RunRecord, RunSpec


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA (this process's current device) when available, else the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def prepare(model, spec: dict[str, Any], device: torch.device):
    """Move and cast a freshly built model as the sweep says, and switch on gradient checkpointing."""
    model = model.to(device=device, dtype=DTYPES[spec.get("dtype", "float32")])
    if spec.get("gradient_checkpointing"):
        # non-reentrant: gradients reach the adapters even though the frozen embeddings' outputs need none
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(f"gradient_checkpointing = true, but the task's model ({type(model).__name__}) has no "
                             "activation/gradient_checkpointing_enable(); use a Hugging Face model or set it to false")
    return model


def lora_config(arm: dict[str, Any], rank: int, alpha: float, seed: int, built) -> lowrank.LoRAConfig:
    return lowrank.LoRAConfig(rank=rank, alpha=alpha, scaling=arm["scaling"], targets=built.targets, trainable=built.head,
                              init=arm["init"], init_options=arm["init_options"], seed=seed,
                              adapter=arm.get("adapter", "lora"), adapter_options=arm.get("adapter_options", {}))


def check_arms(cfg, task) -> None:
    """Every adapter arm x rank fits the task's layers (targets exist, ranks fit their shapes, the
    initializer accepts each layer) and the task gives what each arm needs (evaluation batches, init
    batches for data-driven inits), checked on one built model before any training; a ``ValueError``
    names the arm, the rank and the layer."""
    from lowrank.plan import plan

    built = task.build(cfg.search.seeds[0], cfg.sweep.batch_size)
    for arm in cfg.arms:
        _check_built(built, {"task": cfg.sweep.task, "arm": arm.name, "arm_config": arm.identity()})
        if arm.full_finetune:
            continue
        for rank in cfg.ranks_of(arm):
            lc = lora_config(arm.identity(), rank, cfg.sweep.alpha, 0, built)
            try:
                p = plan(built.model, lc)  # inject's data-free checks, the initializer's per-layer ones included
                if arm.chain is not None:  # the chain's own checks on the layers (XGBLoRA's rank)
                    lowrank.get_chain(arm.chain)(**arm.chain_options).check({s.name: s for s in p.layers})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{cfg.path} arm {arm.name!r} at rank {rank}: {exc}") from None


class _Optimizers:
    """The adapters' preconditioned optimizer and the head's own AdamW, stepped together (``step``, ``zero_grad``)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def _optimizer(model, spec, built):
    arm, lr = spec["arm_config"], spec["lr"]
    head = [p for name, mod in model.named_modules() if name in built.head for p in mod.parameters()]
    head_ids = {id(p) for p in head}
    if arm["full_finetune"]:
        for p in model.parameters():
            p.requires_grad_(True)
        body = [p for p in model.parameters() if id(p) not in head_ids]
        groups = [{"params": body, "lr": lr}] + ([{"params": head, "lr": spec["head_lr"]}] if head else [])
        return torch.optim.AdamW(groups, **_decay(spec))
    cfg = lora_config(arm, spec["rank"], spec["alpha"], spec["seed"], built)
    uses_data = lowrank.get_initializer(arm["init"]).uses_data
    lowrank.inject(model, cfg, data=built.init_batches if uses_data else None, progress=False)
    base = arm.get("optimizer", "adamw")
    if base == "adamw":
        opt = PreconditionedOptimizer(model, base=base, preconditioner=arm["preconditioner"], lr=lr,
                                      **_options(arm, spec))
        for g in opt.param_groups:
            if g["lowrank_role"] == "other":
                g["lr"] = spec["head_lr"]
        return opt
    # another base (LoFT's SGD): the head still trains with AdamW at head_lr, as in every other arm (and as the
    # LoFT authors' optimizer trains non-adapter parameters), so that the head is not what differs between arms
    trained = [p for p in head if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        opt = PreconditionedOptimizer(model, base=base, preconditioner=arm["preconditioner"], lr=lr,
                                      **_options(arm, spec))
    finally:
        for p in trained:
            p.requires_grad_(True)
    return _Optimizers(opt, torch.optim.AdamW(trained, lr=spec["head_lr"], **_decay(spec))) if trained else opt


def _decay(spec) -> dict[str, float]:
    return {} if spec.get("weight_decay") is None else {"weight_decay": spec["weight_decay"]}


def _options(arm, spec) -> dict:
    """The arm's preconditioner / base-optimizer options with the sweep's ``weight_decay``; set in both: an error."""
    opts = dict(arm["preconditioner_options"])
    if "weight_decay" in opts and spec.get("weight_decay") is not None:
        raise ValueError(f"arm {spec['arm']!r}: weight_decay is set both in [sweep] ({spec['weight_decay']}) and in "
                         f"its preconditioner_options ({opts['weight_decay']}); keep one")
    return {**opts, **_decay(spec)}


def schedule_factor(step: int, steps: int, kind: str = "constant", warmup_ratio: float = 0.0) -> float:
    """The learning-rate multiplier for update ``step`` (0-based) of ``steps``: linear warmup from 0 over
    ``ceil(warmup_ratio * steps)`` updates, then 1 (``"constant"``) or a half cosine to 0 (``"cosine"``), as
    ``transformers.get_{constant,cosine}_schedule_with_warmup``."""
    warm = math.ceil(warmup_ratio * steps)
    if step < warm:
        return step / max(1, warm)
    if kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, steps - warm)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class _Schedule:
    """Sets every parameter group's ``lr`` to its rate at the start times :func:`schedule_factor` before each
    update (groups a chain adds later start from the rate they were given)."""

    def __init__(self, opt, spec):
        self.groups = [g for o in getattr(opt, "optimizers", (opt,)) for g in o.param_groups]
        self.opt, self.spec = opt, spec
        self.base = {id(g): g["lr"] for g in self.groups}

    @classmethod
    def of(cls, opt, spec) -> "_Schedule | None":
        """The run's schedule, or ``None`` for a constant rate without warmup (the optimizer's rates untouched)."""
        varies = spec.get("schedule", "constant") != "constant" or spec.get("warmup_ratio", 0.0)
        return cls(opt, spec) if varies else None

    def before(self, step: int) -> None:
        f = schedule_factor(step, self.spec["steps"], self.spec.get("schedule", "constant"),
                            self.spec.get("warmup_ratio", 0.0))
        for o in getattr(self.opt, "optimizers", (self.opt,)):
            for g in o.param_groups:
                g["lr"] = self.base.setdefault(id(g), g["lr"]) * f


def _chain(model, opt, spec, built):
    """The arm's chain (``chain = "cola"`` ...) started on the run's optimizer, or ``None``."""
    arm = spec["arm_config"]
    if not arm.get("chain"):
        return None
    return lowrank.start_chain(model, arm["chain"], optimizer=opt, total_steps=spec["steps"], data=built.init_batches,
                               **arm.get("chain_options", {}))


def _world() -> tuple[int, int]:
    if dist_helpers.active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _regularizer(spec: dict[str, Any]):
    """The adapter's auxiliary training loss, ``model -> scalar`` (``Adapter.auxiliary_loss``: KaSA's, LoRA²'s),
    or ``None``."""
    return lowrank.get_adapter(spec["arm_config"].get("adapter", "lora")).auxiliary_loss


def _training_hook(model, spec: dict[str, Any]):
    """The adapter's per-step hook (``Adapter.training_hook``: LoRA²'s pruning), or ``None``."""
    return lowrank.get_adapter(spec["arm_config"].get("adapter", "lora")).training_hook(model, spec["steps"])


def train_one(task, spec: RunSpec, progress: bool = True) -> RunRecord:
    """Run ``spec`` (one entry of ``Config.runs()``) on ``task``; return its record.

    Under ``torchrun`` (a process group with several ranks) the run is data-parallel: every rank
    builds the same model, estimates data-driven inits on its share of the init batches (the
    estimate is all-reduced), trains a ``DistributedDataParallel`` copy on every ``world``-th batch
    of the seeded stream (global batch = ``world x batch_size``), and all ranks agree on divergence.
    """
    rank, world = _world()
    device = resolve_device(spec.get("device", "auto"))
    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    built = task.build(spec["seed"], spec["batch_size"])
    _check_built(built, spec)
    model = prepare(built.model, spec, device)
    pretrained = _target_weights(model, built.targets) if spec["arm_config"]["full_finetune"] else None
    built.init_batches = [_to(b, device) for b in built.init_batches]
    if world > 1:
        built.init_batches = built.init_batches[rank::world]
        built.train = itertools.islice(built.train, rank, None, world)
    losses, evals, status = [], [], "ok"  # the training loss per step, the validation metrics per evaluation
    with PeakMemory() as mem:
        opt = _optimizer(model, spec, built)
        chain = _chain(model, opt, spec, built)  # COLA, RAC-LoRA, XGBLoRA: links merged at their knots
        schedule = _Schedule.of(opt, spec)
        trainer = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        model.train()
        val = [_to(b, device) for b in built.val_batches]
        show = progress and rank == 0
        evals.append({"step": 0, **_evaluate(task, model, val, show)[0]})
        bar = tqdm(range(1, spec["steps"] + 1), desc=f"{spec['arm']} r={spec['rank']} lr={spec['lr']:g} "
                   f"seed={spec['seed']}", disable=not show, leave=False, unit="step")
        regularizer = _regularizer(spec)  # KaSA's, LoRA²'s auxiliary loss; None for the other adapters
        hook = None if spec["arm_config"]["full_finetune"] else _training_hook(model, spec)  # LoRA²'s pruning
        for step, batch in zip(bar, built.train):
            value = _update(trainer, model, opt, _to(batch, device), spec, step, world, regularizer,
                            (schedule, chain, hook))
            if value is None or math.isnan(value):
                status = "diverged"
                losses.extend([] if value is None else [value])
                break
            losses.append(value)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % spec["eval_every"] == 0 or step == spec["steps"]:
                evals.append({"step": step, **_evaluate(task, model, val, show)[0]})
        bar.close()
        if status == "ok" and len(losses) < spec["steps"]:
            raise RuntimeError(f"task {spec['task']!r}: its training stream ended after {len(losses)} of "
                               f"{spec['steps']} steps; Task.build must return a stream without end (cycle the data)")
        if status == "ok":
            final_val = {k: v for k, v in evals[-1].items() if k != "step"}
            final_test, test_outcomes = _evaluate(task, model, [_to(b, device) for b in built.test_batches], show)
            intruders = intruder_summary(model, pretrained)
        else:
            final_val = final_test = dict.fromkeys(task.metrics)
            intruders, test_outcomes = None, {}
    return {**spec, "status": status, "intruders": intruders, "loss_curve": losses, "eval": evals, "val": final_val,
            "test": final_test, "wall_time_s": time.perf_counter() - t0, "peak_memory_bytes": mem.extra,
            "world_size": world, **_provenance(chain, test_outcomes, built.test_batches)}


def _provenance(chain, test_outcomes: dict[str, list[float]], test_batches) -> dict[str, Any]:
    """A record's versions, its chain's link count and its compact per-example test outcomes (where present)."""
    return {"lowrank_version": lowrank.__version__, "torch_version": torch.__version__,
            **({"links": chain.links} if chain is not None else {}),
            **({"test_outcomes": {k: outcomes.encode(v, outcomes.fingerprint(test_batches))
                                  for k, v in test_outcomes.items()}} if test_outcomes else {})}


def _update(trainer, model, opt, batch, spec, step: int, world: int, regularizer, hooks) -> float | None:
    """One training step. Returns its task loss (averaged over ranks); ``nan`` when the loss is not finite on
    some rank (nothing is updated), ``None`` when the optimizer refused the step (a non-finite gradient).
    ``hooks``: the rate schedule, the chain and the adapter's training hook (each may be ``None``)."""
    schedule, chain, hook = hooks
    loss = trainer(**batch).loss
    if not _all_finite(loss, world):
        return float("nan")
    opt.zero_grad(set_to_none=True)
    (loss if regularizer is None else loss + regularizer(model)).backward()  # logged: the task loss
    if spec.get("max_grad_norm") is not None:
        trained = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trained, spec["max_grad_norm"])
    if schedule is not None:
        schedule.before(step - 1)
    try:
        opt.step()
    except FloatingPointError:
        return None
    if chain is not None:
        chain.step()
    if hook is not None:
        hook.step()
    return _mean_over_ranks(loss, world)


def _evaluate(task, model, batches, progress: bool) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The task's metrics and its per-example outcomes, if it returns any (``outcomes.split``)."""
    return outcomes.split(task.evaluate(model, batches, progress=progress), f"task {task.registry_name!r}")


INTRUDER_TOP_K, INTRUDER_EPSILON = 10, 0.5
"""The intruder-dimension test of arXiv 2410.21228 as PEFT applies it (``lowrank.theory.intruder_dimensions``)."""


def _target_weights(model, targets) -> dict[str, torch.Tensor]:
    """Copies of the target layers' pretrained weights, ``(d_out, d_in)``: what full fine-tuning is compared with."""
    from lowrank.weights import SUPPORTED_TYPES, weight_view
    from lowrank.config import matches_targets

    return {n: weight_view(m).detach().clone() for n, m in model.named_modules()
            if n and isinstance(m, SUPPORTED_TYPES) and matches_targets(targets, n)}


def intruder_summary(model, pretrained: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Intruder dimensions of the trained target layers against their pretrained weights, a forgetting metric:
    ``total`` over layers (each counts its top-``top_k`` singular vectors with ``max |cos| < epsilon``), ``layers``
    and ``layers_with`` (how many have at least one). ``pretrained``: the full fine-tuning arm's copies."""
    from lowrank.weights import weight_view
    from lowrank.theory import intruder_dimensions, model_intruder_dimensions

    if pretrained is None:
        found = model_intruder_dimensions(model, INTRUDER_TOP_K, INTRUDER_EPSILON)
    else:
        modules = dict(model.named_modules())
        found = {n: intruder_dimensions(w0, weight_view(modules[n]), INTRUDER_TOP_K, INTRUDER_EPSILON)
                 for n, w0 in pretrained.items()}
    counts = [r.count for r in found.values()]
    return {"total": sum(counts), "layers": len(counts), "layers_with": sum(c > 0 for c in counts),
            "top_k": INTRUDER_TOP_K, "epsilon": INTRUDER_EPSILON}


def _check_built(built, spec) -> None:
    """What a run needs from the task, before any training (an empty split would divide by zero later)."""
    where = f"task {spec['task']!r}"
    for split in ("val_batches", "test_batches"):
        if not list(getattr(built, split)):
            raise ValueError(f"{where}: {split} is empty; the task must give at least one evaluation batch")
    uses_data = not spec["arm_config"]["full_finetune"] and lowrank.get_initializer(spec["arm_config"]["init"]).uses_data
    if uses_data and not built.init_batches:
        raise ValueError(f"{where}: init_batches is empty but arm {spec['arm']!r} uses the data-driven initializer "
                         f"{spec['arm_config']['init']!r}; raise the task's init_batches")


def _to(batch, device):
    """Tensors of a dict batch moved to ``device`` (other values, e.g. reference answers, kept)."""
    if device.type == "cpu" or not isinstance(batch, dict):
        return batch
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    ok = torch.tensor([1.0 if math.isfinite(loss.item()) else 0.0])
    if world > 1:
        dist_helpers.all_reduce_(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    if world == 1:
        return loss.item()
    t = loss.detach().float().reshape(1).cpu()
    dist_helpers.all_reduce_(t)
    return t.item() / world


def append_record(path: str | Path, record: RunRecord) -> None:
    """One JSON line, written with a single ``write`` under an exclusive lock, then fsync'ed. A record that would
    not read back as a :class:`~lowrank_ablation.records.RunRecord` is a ``ValueError`` and nothing is written
    (written, it would be skipped on every read and its run repeated on every resume)."""
    path = Path(path)
    text = json.dumps(record, default=float)
    bad = records.problems(json.loads(text))
    if bad:
        raise ValueError(f"run {record.get('arm')!r} (key {record.get('key')!r}) is not a valid record: {bad}; "
                         "a task's evaluate() must return a number (or None) per metric")
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (text + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line from a crash: start a fresh one
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def is_record(obj: Any) -> bool:
    """A results line this runner wrote: a :class:`~lowrank_ablation.records.RunRecord` (its required fields, each
    field it has of its declared type)."""
    return not records.problems(obj)


def read_records(path: str | Path, *, warn: bool = True) -> list[RunRecord]:
    """Records of a results file. Lines that are not records (a torn line from a crash, bytes that are
    not UTF-8, valid JSON that is not a record, a record of an older format) are skipped and counted
    on stderr; every valid line is kept. A skipped run is simply run again on resume."""
    path = Path(path)
    if not path.exists():
        return []
    out, skipped = [], []
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if is_record(obj):
            out.append(obj)
        else:
            skipped.append(i)
    if skipped and warn:
        import sys

        print(f"{path}: skipped {len(skipped)} line(s) that are not run records (lines {skipped[:5]}"
              f"{'...' if len(skipped) > 5 else ''}); their runs, if any, are run again", file=sys.stderr)
    return out
