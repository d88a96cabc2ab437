"""``lowrank.hf.LowRankMixin`` with TRL's ``SFTTrainer`` on a tiny Llama with the real SmolLM2 tokenizer (offline): a
data-driven init on SFT's own collated batches, training, and an adapter-only checkpoint that rebuilds the trained
model on the original one."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import lowrank  # noqa: E402
from lowrank.hf import LowRankMixin  # noqa: E402
from lowrank.io import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402


class LowRankSFT(LowRankMixin, trl.SFTTrainer):
    """Records the batches the init saw."""

    def _init_batches(self):
        self.init_seen = super()._init_batches()
        return self.init_seen


def test_sft_trainer_with_the_mixin_trains_and_writes_an_adapter_only_checkpoint(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    texts = [f"{a} plus {a + 3} is {2 * a + 3}." for a in range(16)]
    data = datasets.Dataset.from_dict({"text": texts})
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                         max_length=32, report_to=[], use_cpu=True, save_strategy="steps", save_steps=4,
                         logging_steps=1, disable_tqdm=True, bf16=False)  # bf16: accelerate would leave
    # trainer.model's forward under CPU autocast, so its logits would not be comparable with a plain model's
    cfg = lowrank.LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], init="lora_ga",
                             scaling="rslora", init_options={"progress": False})
    trainer = LowRankSFT(model=AutoModelForCausalLM.from_pretrained(tiny_lm_dir), args=args, train_dataset=data,
                         processing_class=tok, lowrank_config=cfg, lowrank_optimizer="riemannian",
                         lowrank_init_batches=2)
    trainer.train()
    assert len(trainer.init_seen) == 2 and "labels" in trainer.init_seen[0]  # SFT's collated batches
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, lowrank.optim.PreconditionedOptimizer) and opt.steps == 4
    ckpt = tmp_path / "checkpoint-4"
    files = {p.name for p in ckpt.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))], files
    size = (ckpt / WEIGHTS_NAME).stat().st_size
    full = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    assert size < full / 20, (size, full)  # the adapter, not the 1.6M-parameter model
    # the checkpoint rebuilds the trained model on the original one
    rebuilt = lowrank.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), ckpt).eval()
    want, got = trainer.model.state_dict(), rebuilt.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = tok(["7 plus 10 is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=x).logits, trainer.model.eval()(input_ids=x).logits)
