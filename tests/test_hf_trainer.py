"""``lowrank.hf.LowRankTrainer`` on a tiny Llama: the init runs at ``train()`` before the optimizer exists, on the
trainer's own first batches, and leaves the RNG as it found it; the optimizer holds exactly the adapters and the
Trainer's scheduler drives it; a run lowers the loss; checkpoints hold the adapter only (<= 1.1x its tensor
bytes) and a resumed run ends bitwise equal to an uninterrupted one (model and optimizer state); the best adapter
is loaded at the end; bad input is refused with a clear error; 2 gloo processes init identically, one writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from lowrank.hf import LowRankTrainer  # noqa: E402
from lowrank.io import WEIGHTS_NAME, read_adapter  # noqa: E402
from tests.conftest import VOCAB, tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
GA = dict(init="lora_ga", init_options={"progress": False}, scaling="rslora")


def dataset(n: int = 16, seq: int = 10, distinct: int | None = None, seed: int = 0):
    """Token-id sequences (``distinct`` repeated ones make a set the model can memorize)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (distinct or n, seq), generator=g).repeat((n + (distinct or n) - 1) // (distinct or n), 1)[:n]
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def targs(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, report_to=[],
                use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=3)
    return transformers.TrainingArguments(**{**base, **kw})


def config(**kw):
    return lowrank.LoRAConfig(**{"rank": 4, "alpha": 8, "targets": TARGETS, **kw})


def adapter_params(model):
    return {id(p) for _, layer in lowrank.adapted_layers(model) for p in layer.adapter_parameters().values()}


def tensors(model):
    return {f"{n}.{k}": t.detach().clone() for n, layer in lowrank.adapted_layers(model) for k, t in layer.tensors().items()}


class Recording(LowRankTrainer):
    """Records what the model holds when the Trainer asks for its optimizer."""

    def create_optimizer(self, model=None):
        self.adapters_at_optimizer = tensors(self.model)
        return super().create_optimizer(model)


def test_init_runs_on_the_first_batches_before_the_optimizer_which_holds_exactly_the_adapters(tmp_path):
    args = targs(tmp_path, warmup_steps=2, max_steps=5)
    trainer = Recording(model=tiny_llama(), args=args, train_dataset=dataset(), lowrank_config=config(**GA),
                        lowrank_optimizer="riemannian", lowrank_init_batches=2)
    # the batches the init will see: the trainer's own dataloader, from the RNG state train() starts in
    rng = torch.get_rng_state()  # as train() will find it (set_seed in __init__)
    with torch.random.fork_rng():
        loader = iter(trainer.get_train_dataloader())
        first = [next(loader) for _ in range(2)]
        reference = lowrank.inject(tiny_llama(), config(**GA), data=first, progress=False)
        twin = LowRankTrainer(model=tiny_llama(), args=args, train_dataset=dataset(), lowrank_config=config(**GA))
        before = torch.get_rng_state()
        twin._lowrank_setup(None)
        assert torch.equal(torch.get_rng_state(), before)  # the init leaves the global RNG as it found it
    assert torch.equal(torch.get_rng_state(), rng)

    trainer.train()
    assert trainer.adapters_at_optimizer, "the adapters did not exist when the optimizer was created"
    want = tensors(reference)  # A, B and the offset factors A0, B0 of the init on those batches
    got = trainer.adapters_at_optimizer
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around it
    assert isinstance(opt, lowrank.optim.PreconditionedOptimizer) and opt.preconditioner.registry_name == "riemannian"
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(set(held)) and set(held) == adapter_params(trainer.model)
    assert {id(p) for p in trainer.model.parameters() if p.requires_grad} == set(held)
    assert opt.steps == 5 and all(g["weight_decay"] == args.weight_decay for g in opt.param_groups)
    # the Trainer's scheduler drives it, warm-up from the first step after the init
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    ref = transformers.get_scheduler("linear", ref_opt, num_warmup_steps=2, num_training_steps=5)
    expected = []
    for _ in range(5):
        expected.append(ref.get_last_lr()[0])
        ref_opt.step()
        ref.step()
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_training_lowers_the_loss(tmp_path):
    data = dataset(n=16, distinct=4)
    trainer = LowRankTrainer(model=tiny_llama(), args=targs(tmp_path, max_steps=30, learning_rate=2e-2),
                             train_dataset=data, eval_dataset=data, lowrank_config=config(init="kaiming"),
                             lowrank_optimizer={"preconditioner": "lora_plus", "ratio": 4.0})
    before = trainer.evaluate()["eval_loss"]  # the model without adapters: the same function as kaiming's (B = 0)
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.2, (before, after)  # ~0.37 nats here; the loss noise of this set is ~0.02
    groups = {g["lowrank_role"]: g["lr"] for g in trainer.optimizer.optimizer.param_groups}
    assert groups["B"] == pytest.approx(4.0 * groups["A"])  # LoRA+'s ratio went to the preconditioner


def test_checkpoint_holds_the_adapter_only_and_the_peft_export_loads(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = LowRankTrainer(model=tiny_llama(), args=targs(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                             train_dataset=dataset(), lowrank_config=config(rank=16, targets=["q_proj", "down_proj"], **GA),
                             lowrank_init_batches=1, lowrank_peft_export=True)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    files = sorted(p.name for p in ckpt.iterdir())
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))], files
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", WEIGHTS_NAME} <= set(files)
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors(trainer.model).values())
    size = (ckpt / WEIGHTS_NAME).stat().st_size
    print(f"adapter file {size} B, adapter tensors {adapter_bytes} B, ratio {size / adapter_bytes:.4f}")
    assert size <= 1.1 * adapter_bytes
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=x).logits
        loaded = lowrank.load_adapter(tiny_llama(), ckpt)  # the lowrank file, into the original model
        assert torch.equal(loaded(input_ids=x).logits, want)
        via_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(ckpt)).eval()
        assert torch.allclose(via_peft(input_ids=x).logits, want, atol=1e-5)


def _resumable(out, **kw):
    args = targs(out, max_steps=8, save_strategy="steps", save_steps=3, **kw)  # 4 steps an epoch: resume mid-epoch
    return LowRankTrainer(model=tiny_llama(), args=args, train_dataset=dataset(),
                          lowrank_config=config(dropout=0.1, **GA), lowrank_optimizer="riemannian",
                          lowrank_init_batches=2)


def test_resuming_from_a_mid_run_checkpoint_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full = _resumable(tmp_path / "full")
    full.train()
    resumed = _resumable(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.state.global_step == 8
    a, b = full.model.state_dict(), resumed.model.state_dict()  # base weights (offset) and adapters
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    sa, sb = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["steps"] == sb["steps"] == 8
    ta = [t for st in sa["base"]["state"].values() for t in st.values()]
    tb = [t for st in sb["base"]["state"].values() for t in st.values()]
    assert len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert full.lr_scheduler.state_dict() == resumed.lr_scheduler.state_dict()
    # the Trainer's own resume=True finds the last checkpoint: the same end
    again = _resumable(tmp_path / "full")
    again.train(resume_from_checkpoint=True)  # checkpoint-8: nothing left to train
    assert all(torch.equal(a[k], v) for k, v in again.model.state_dict().items())


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    data = dataset(n=8)
    holder = {}

    def metrics(_):  # best at step 4 of 8
        return {"score": -abs(holder["trainer"].state.global_step - 4)}

    args = targs(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = LowRankTrainer(model=tiny_llama(), args=args, train_dataset=data, eval_dataset=data,
                             compute_metrics=metrics, lowrank_config=config(init="pissa"))
    holder["trainer"] = trainer
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    _, best = read_adapter(tmp_path / "checkpoint-4")
    _, last = read_adapter(tmp_path / "checkpoint-8")
    now = {f"layers.{k}": v for k, v in tensors(trainer.model).items()}
    assert now.keys() == best.keys() and all(torch.equal(now[k], best[k]) for k in best)
    assert any(not torch.equal(now[k], last[k]) for k in last)


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    args, data, cfg = targs(tmp_path), dataset(), config(**GA)
    plain = tiny_llama()
    with pytest.raises(TypeError, match="LoRAConfig"):
        LowRankTrainer(model=plain, args=args, train_dataset=data, lowrank_config={"rank": 4})
    with pytest.raises(ValueError, match="lowrank_init_batches must be a positive integer"):
        LowRankTrainer(model=plain, args=args, train_dataset=data, lowrank_config=cfg, lowrank_init_batches=0)
    with pytest.raises(ValueError, match="learning_rate"):
        LowRankTrainer(model=plain, args=args, train_dataset=data, lowrank_config=cfg, lowrank_optimizer={"lr": 1.0})
    with pytest.raises(ValueError, match="needs lowrank_config"):
        LowRankTrainer(model=plain, args=args, train_dataset=data)
    early = torch.optim.AdamW(plain.parameters(), lr=1e-3)  # built before the init: cannot hold the adapters
    with pytest.raises(ValueError, match="built before the lowrank init"):
        LowRankTrainer(model=plain, args=args, train_dataset=data, lowrank_config=cfg, optimizers=(early, None))
    sched = torch.optim.lr_scheduler.LambdaLR(early, lambda s: 1.0)
    with pytest.raises(ValueError, match="bound to another optimizer"):
        LowRankTrainer(model=plain, args=args, train_dataset=data, lowrank_config=cfg, optimizers=(None, sched))
    with pytest.raises(ValueError, match="data-driven.*train_dataset=None"):
        LowRankTrainer(model=plain, args=args, lowrank_config=cfg)
    injected = lowrank.inject(tiny_llama(), config(init="kaiming"))
    with pytest.raises(ValueError, match="another config .*init: 'kaiming' != 'lora_ga'"):
        LowRankTrainer(model=injected, args=args, train_dataset=data, lowrank_config=cfg)
    head_only = torch.optim.AdamW([next(p for p in injected.parameters() if p.requires_grad)], lr=1e-3)
    with pytest.raises(ValueError, match="does not hold the trainable parameter"):
        LowRankTrainer(model=injected, args=args, train_dataset=data, optimizers=(head_only, None))
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs gives .*cannot wrap"):
        LowRankTrainer(model=tiny_llama(), args=args, train_dataset=data, lowrank_config=config(),
                       optimizer_cls_and_kwargs=(lambda params, **kw: None, {"lr": 1e-3})).train()
    with pytest.raises(ValueError, match="both optimizer_cls_and_kwargs and lowrank_optimizer"):
        LowRankTrainer(model=tiny_llama(), args=args, train_dataset=data, lowrank_config=config(),
                       optimizer_cls_and_kwargs=(torch.optim.SGD, {}), lowrank_optimizer={"base": "sgd"})
    # a pre-injected model with its own optimizer over all its adapters is accepted and trained
    mine = lowrank.optim.PreconditionedOptimizer(injected, lr=1e-2)
    trainer = LowRankTrainer(model=injected, args=targs(tmp_path, max_steps=1), train_dataset=data, optimizers=(mine, None))
    trainer.train()
    assert mine.steps == 1
    # a checkpoint of another config
    trainer.save_model(str(tmp_path / "kaiming"))
    with pytest.raises(ValueError, match="another lowrank config"):
        LowRankTrainer(model=tiny_llama(), args=args, train_dataset=data, lowrank_config=cfg).train(
            resume_from_checkpoint=str(tmp_path / "kaiming"))


WORKER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    import lowrank, lowrank.hf
    from tests.test_hf_trainer import Recording, config, dataset, targs, tiny_llama, GA
    rank = int(os.environ["RANK"])
    writers = []
    real = lowrank.hf.save_adapter
    lowrank.hf.save_adapter = lambda model, path: (writers.append(rank), real(model, path))[1]
    seen = []
    class Seeing(Recording):
        def _init_batches(self):
            out = super()._init_batches()
            seen.extend(b["input_ids"].clone() for b in out)
            return out
    trainer = Seeing(model=tiny_llama(), args=targs({out!r}, max_steps=2, save_strategy="steps", save_steps=2,
                     per_device_train_batch_size=2), train_dataset=dataset(), lowrank_config=config(**GA),
                     lowrank_init_batches=2)
    trainer.train()
    torch.save({{"init": trainer.adapters_at_optimizer, "seen": seen, "writers": writers,
                "world": torch.distributed.get_world_size()}}, os.path.join({out!r}, f"rank{{rank}}.pt"))
""")


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    # accelerate's multi-process launcher (torch.distributed.run inside; with no GPU the processes use gloo on CPU;
    # its --cpu flag would need mpirun instead)
    "accelerate launch": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_gloo_processes_init_identically_and_one_writes_checkpoints(tmp_path, launcher):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(Path(__file__).parent.parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, *LAUNCHERS[launcher], str(script)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert not any(torch.equal(a, b) for a, b in zip(r0["seen"], r1["seen"]))  # each rank saw its own shard
    assert r0["init"].keys() == r1["init"].keys() and all(torch.equal(r0["init"][k], r1["init"][k]) for k in r0["init"])
    assert r0["writers"] == [0] and r1["writers"] == []
    assert (tmp_path / "checkpoint-2" / WEIGHTS_NAME).is_file()
