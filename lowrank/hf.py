"""Hugging Face ``transformers.Trainer`` (and TRL) integration: ``LowRankTrainer`` and ``LowRankMixin``.

    from lowrank.hf import LowRankTrainer
    trainer = LowRankTrainer(model=model, args=args, train_dataset=ds,
                             lowrank_config=lowrank.LoRAConfig(rank=8, targets=["q_proj", "v_proj"], init="lora_ga"),
                             lowrank_optimizer="riemannian", lowrank_init_batches=8)
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

    class LowRankSFT(LowRankMixin, trl.SFTTrainer): ...   # any Trainer subclass

Import it explicitly (``import lowrank`` never imports transformers). What the mixin changes:

- ``train()`` first runs ``lowrank.inject(model, config, data=...)``, with the first ``lowrank_init_batches``
  batches of the trainer's own train dataloader (prepared as the Trainer prepares its inputs: on its
  device, sharded per process under ``torchrun``, so a data-parallel init sees every rank's share and gives
  the same factors on every rank) for a data-driven init, none for a data-free one. The global RNGs (torch,
  CUDA, numpy, ``random``) are put back afterwards, so the run's data order and dropout are those of the
  same run without the init. This happens before the Trainer creates its optimizer and scheduler: the
  adapters are what is optimized, and the warm-up starts after the init. Resuming
  (``resume_from_checkpoint``) skips the init and rebuilds the adapters from the checkpoint (the offset of
  an offset init included), then the Trainer restores optimizer, scheduler, RNG and its state.
- ``create_optimizer`` builds :class:`lowrank.optim.PreconditionedOptimizer` around the base optimizer the
  Trainer would build (``args.optim``, or ``optimizer_cls_and_kwargs``: learning rate, betas, eps, fused,
  ``optim_args``) with ``args.weight_decay`` (not on bias and norm parameters of ``trainable`` modules, as
  the Trainer does); ``lowrank_optimizer`` picks the preconditioner and its options. The Trainer's own
  scheduler drives it.
- Checkpoints and ``save_model`` hold the adapter only (``lowrank.save_adapter``: safetensors + JSON),
  optionally also the PEFT export (``lowrank_peft_export=True``), plus the Trainer's optimizer, scheduler,
  RNG and state files; ``load_best_model_at_end`` loads the best checkpoint's adapter.

Not supported: ``model_init`` (hyperparameter search), DeepSpeed and FSDP (lowrank refuses sharded weights).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .config import LoRAConfig
from .inject import inject
from .io import CONFIG_NAME, config_from_file, load_adapter, save_adapter
from .optim import BASES, PreconditionedOptimizer, Preconditioner
from .plan import RECORD_ATTR, unwrap
from .registry import get_initializer

TRAINING_ARGS_NAME = "training_args.bin"
_ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW)


def differences(a: LoRAConfig, b: LoRAConfig) -> list[str]:
    """``field: a != b`` for each field two configs disagree on."""
    return [f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}" for f in dataclasses.fields(LoRAConfig)
            if getattr(a, f.name) != getattr(b, f.name)]


def _optimizer_spec(spec: Any) -> dict[str, Any]:
    """``lowrank_optimizer`` as ``{"preconditioner": ..., "base": ... (optional), **options}``."""
    if spec is None:
        return {"preconditioner": "identity"}
    if isinstance(spec, dict):
        if "lr" in spec:
            raise ValueError("lowrank_optimizer has 'lr': the learning rate is TrainingArguments(learning_rate=...), "
                             "which the Trainer's scheduler also reads")
        return {"preconditioner": "identity", **spec}
    if isinstance(spec, (str, list, tuple, Preconditioner)):
        return {"preconditioner": spec}
    raise TypeError(f"lowrank_optimizer must be a preconditioner name (lowrank.list_preconditioners()), a list of "
                    f"them, a Preconditioner, or a dict {{'preconditioner': ..., 'base': ..., **options}}; got {spec!r}")


@contextmanager
def preserved_rng(device: torch.device):
    """Put back the torch (CPU and ``device``), numpy and ``random`` generators on exit."""
    import numpy as np

    state = random.getstate(), np.random.get_state()
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...: generators per device
    devices = [device] if device.type != "cpu" and hasattr(backend, "device_count") and hasattr(
        backend, "get_rng_state") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


class LowRankMixin:
    """Put before a ``transformers.Trainer`` subclass: ``class MySFT(LowRankMixin, SFTTrainer)``.

    Args (keywords, besides the trainer's own):
        lowrank_config: the :class:`lowrank.LoRAConfig`; optional when the model already has lowrank adapters
            (then theirs), an error when it has adapters of another config.
        lowrank_optimizer: the preconditioner: a name (``"riemannian"``), a list of names, a ``Preconditioner``,
            or a dict ``{"preconditioner": ..., "base": "adamw" | "sgd" | an Optimizer class, **options}``
            (options of the preconditioner, e.g. ``ratio``, or of the base optimizer; they override the
            Trainer-derived ones). Default: ``identity`` on the Trainer's ``args.optim``.
        lowrank_init_batches: how many train-dataloader batches a data-driven init sees (per process).
        lowrank_loss_fn: ``loss_fn(model, batch)`` for the init's data pass (default ``model(**batch).loss``).
        lowrank_peft_export: also write the PEFT export (``lowrank.peft.export``) into every checkpoint.
    """

    def __init__(self, *args: Any, lowrank_config: LoRAConfig | None = None, lowrank_optimizer: Any = None,
                 lowrank_init_batches: int = 8, lowrank_loss_fn: Callable | None = None,
                 lowrank_peft_export: bool = False, **kwargs: Any):
        if lowrank_config is not None and not isinstance(lowrank_config, LoRAConfig):
            raise TypeError(f"lowrank_config must be a lowrank.LoRAConfig, got {type(lowrank_config).__name__}")
        if not isinstance(lowrank_init_batches, int) or isinstance(lowrank_init_batches, bool) or lowrank_init_batches < 1:
            raise ValueError(f"lowrank_init_batches must be a positive integer, got {lowrank_init_batches!r}")
        self._lowrank_optimizer = _optimizer_spec(lowrank_optimizer)
        self._lowrank_optimizer_given = lowrank_optimizer is not None
        self.lowrank_init_batches = lowrank_init_batches
        self.lowrank_loss_fn = lowrank_loss_fn
        self.lowrank_peft_export = bool(lowrank_peft_export)
        super().__init__(*args, **kwargs)
        self.lowrank_config = self._lowrank_check(lowrank_config)

    # ---- checks (at construction, before anything runs) ----

    def _lowrank_check(self, config: LoRAConfig | None) -> LoRAConfig:
        who = type(self).__name__
        if self.model_init is not None:
            raise ValueError(f"{who} does not support model_init (hyperparameter search); pass model= instead")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(f"{who} does not support DeepSpeed or FSDP: lowrank injects into full (unsharded) weights; "
                             "use DDP (torchrun without a DeepSpeed/FSDP config)")
        record = getattr(unwrap(self.model), RECORD_ATTR, None)
        if record is not None and config is not None and record.config != config:
            raise ValueError(f"the model already has lowrank adapters with another config ("
                             f"{'; '.join(differences(record.config, config))}); pass lowrank_config=None to train "
                             "them, or give the trainer the model without adapters")
        config = config if config is not None else getattr(record, "config", None)
        if config is None:
            raise ValueError(f"{who} needs lowrank_config=lowrank.LoRAConfig(...) (the model has no lowrank adapters)")
        self._lowrank_check_optimizers(record is not None)
        if record is None and get_initializer(config.init).uses_data and self.train_dataset is None:
            raise ValueError(f"initializer {config.init!r} is data-driven and needs batches of the train dataset, but "
                             f"{who} got train_dataset=None; pass train_dataset=, or use a data-free init (kaiming, pissa)")
        return config

    def _lowrank_check_optimizers(self, injected: bool) -> None:
        if self.optimizer is None:
            if self.lr_scheduler is not None:
                raise ValueError("optimizers=(None, scheduler): the scheduler is bound to another optimizer than the one "
                                 "the trainer will build; pass (None, None) (the Trainer's scheduler is then used)")
            base = self._lowrank_optimizer.get("base")
            if base is not None and self.optimizer_cls_and_kwargs is not None:
                raise ValueError("both optimizer_cls_and_kwargs and lowrank_optimizer['base'] name the base optimizer; "
                                 "pass only one")
            return
        if self._lowrank_optimizer_given:
            raise ValueError("both optimizers=(opt, sched) and lowrank_optimizer= were given; pass only one")
        if not injected:
            raise ValueError("optimizers=(opt, sched) was built before the lowrank init, which creates the adapter "
                             "parameters at train(): it cannot optimize them. Pass lowrank_optimizer=... instead (the "
                             "trainer builds the optimizer after the init), or inject first and build the optimizer "
                             "on the injected model")
        covered = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in unwrap(self.model).named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(f"the optimizer passed in optimizers=(opt, sched) does not hold the trainable parameter "
                             f"{missing[0]!r} ({len(missing)} missing): build it on the injected model, e.g. "
                             "lowrank.optim.PreconditionedOptimizer(model, ...)")

    # ---- the init, at the start of train() ----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        resume = resume_from_checkpoint or None
        self._lowrank_setup(resume)
        return super().train(resume, *args, **kwargs)

    def _lowrank_setup(self, resume: str | None) -> None:
        model = unwrap(self.model)
        if getattr(model, RECORD_ATTR, None) is not None:
            return  # injected already (by a previous train(), or by the user with this config)
        if resume is not None:
            self._check_checkpoint(resume)
            load_adapter(model, resume)  # the checkpoint's adapters on the original base, offset rebuilt
        else:
            data_driven = get_initializer(self.lowrank_config.init).uses_data
            show = self.is_local_process_zero() and not self.args.disable_tqdm
            with preserved_rng(self.args.device):
                data = self._init_batches() if data_driven else None
                inject(model, self.lowrank_config, data=data, loss_fn=self.lowrank_loss_fn, progress=show)

    def _init_batches(self) -> list:
        """The first ``lowrank_init_batches`` batches of this process's train dataloader, prepared as the
        Trainer prepares its inputs."""
        loader = self.get_train_dataloader()
        it = iter(loader)
        out = []
        try:
            for _ in range(self.lowrank_init_batches):
                out.append(self._prepare_inputs(next(it)))
        except StopIteration:
            pass
        finally:
            if hasattr(it, "close"):
                it.close()
            if hasattr(loader, "end"):  # accelerate: an iteration stopped early is no longer the active one
                loader.end()
        if not out:
            raise ValueError(f"the train dataloader yielded no batch for the data-driven init {self.lowrank_config.init!r}")
        return out

    def _check_checkpoint(self, path: str | os.PathLike) -> None:
        cfg_path = Path(path) / CONFIG_NAME
        if not cfg_path.is_file():
            raise ValueError(f"{path} holds no lowrank adapter ({CONFIG_NAME}): {type(self).__name__} resumes from the "
                             "adapter-only checkpoints it writes itself")
        meta = json.loads(cfg_path.read_text())
        saved, _ = config_from_file(meta.get("config") if isinstance(meta, dict) else None, cfg_path, warn=False)
        if saved != self.lowrank_config:
            raise ValueError(f"checkpoint {path} was trained with another lowrank config "
                             f"({'; '.join(differences(saved, self.lowrank_config))}); pass its config: "
                             f"lowrank_config=lowrank.LoRAConfig.from_dict({saved.to_dict()!r})")

    # ---- the optimizer ----

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = self._build_lowrank_optimizer(unwrap(self.model if model is None else model))
        return super().create_optimizer(model)  # returns the optimizer it finds (SageMaker wrapping aside)

    def _base_optimizer(self, model, base) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The base optimizer class and its keywords: the Trainer's (``args.optim`` or ``optimizer_cls_and_kwargs``)
        unless ``lowrank_optimizer`` names one."""
        args = self.args
        if base is not None:
            cls = BASES[base.lower()] if isinstance(base, str) and base.lower() in BASES else base
            if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
                raise ValueError(f"lowrank_optimizer['base']={base!r}: use one of {sorted(BASES)} or a "
                                 "torch.optim.Optimizer subclass")
            kw = {"lr": args.learning_rate}
            if issubclass(cls, _ADAM_LIKE):
                kw.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
            return cls, kw
        cls, kw = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(args, model)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or {"params", "model",
                                                                                      "optimizer_dict"} & set(kw):
            source = "optimizer_cls_and_kwargs" if self.optimizer_cls_and_kwargs else f"args.optim={str(args.optim)!r}"
            raise ValueError(f"{source} gives {cls!r}, which lowrank's PreconditionedOptimizer cannot wrap (it needs a "
                             "torch.optim.Optimizer class taking param groups); use optim='adamw_torch' (or 'sgd', "
                             "'adagrad', 'rmsprop', 'adafactor'), or lowrank_optimizer={'base': 'adamw'}")
        return cls, dict(kw)

    def _build_lowrank_optimizer(self, model) -> PreconditionedOptimizer:
        spec = dict(self._lowrank_optimizer)
        precond = spec.pop("preconditioner")
        cls, kw = self._base_optimizer(model, spec.pop("base", None))
        lr = kw.pop("lr", self.args.learning_rate)
        kw.setdefault("weight_decay", self.args.weight_decay)
        kw.update(spec)
        opt = PreconditionedOptimizer(model, base=cls, preconditioner=precond, lr=lr, **kw)
        decay = set(self.get_decay_parameter_names(model))
        names = {id(p): n for n, p in model.named_parameters()}
        for group in [g for g in opt.param_groups if g["lowrank_role"] == "other" and g.get("weight_decay")]:
            plain = [p for p in group["params"] if names[id(p)] not in decay]  # bias, norms: no decay (as Trainer)
            kept = [p for p in group["params"] if names[id(p)] in decay]
            if plain and not kept:
                group["weight_decay"] = 0.0
            elif plain:
                group["params"] = kept
                opt.base.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": plain,
                                          "weight_decay": 0.0})
        return opt

    # ---- checkpoints: the adapter only ----

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.model, output_dir)
        if self.lowrank_peft_export:
            from .peft import export

            export(self.model, output_dir)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._check_checkpoint(resume_from_checkpoint)
        load_adapter(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter(self.model, self.state.best_model_checkpoint)


class LowRankTrainer(LowRankMixin, Trainer):
    """A ``transformers.Trainer`` that injects, optimizes and checkpoints lowrank adapters (:class:`LowRankMixin`)."""


class ChainCallback(TrainerCallback):
    """Run a chain (``lowrank.list_chains()``: COLA, RAC-LoRA, XGBLoRA) in a ``Trainer``:
    ``LowRankTrainer(..., callbacks=[ChainCallback("cola", links=3)])``. The chain starts when training begins
    (on the Trainer's optimizer, over ``state.max_steps`` optimizer steps) and ends a link at each of its knots
    (``on_step_end``: after the optimizer step, gradient accumulation counted as the Trainer counts it).
    ``data`` / ``loss_fn``: batches for a data-driven link initializer (``init="lora_ga"``). ``run`` is the
    :class:`lowrank.ChainRun` once training has begun. Resuming a chained run from a checkpoint is refused (the
    chain's position is not in the checkpoint)."""

    def __init__(self, chain: str, *, data: Any = None, loss_fn: Callable | None = None, **options: Any):
        from .registry import get_chain

        self.chain = get_chain(chain)(**options)  # options checked now, not when training starts
        self.data, self.loss_fn, self.run = data, loss_fn, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from .chains import ChainRun

        if state.global_step > 0:
            raise ValueError(f"ChainCallback: training resumes at step {state.global_step}, but a chain's position is "
                             "not saved in checkpoints; start the chained run from the beginning")
        self.run = ChainRun(unwrap(model), self.chain, optimizer=optimizer, total_steps=state.max_steps,
                            data=self.data, loss_fn=self.loss_fn)

    def on_step_end(self, args, state, control, **kwargs):
        self.run.step()


__all__ = ["LowRankTrainer", "LowRankMixin", "ChainCallback", "differences", "preserved_rng"]
