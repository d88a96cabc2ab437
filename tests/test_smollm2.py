"""The offline SmolLM2-135M on reasoning-gym data through the causal-lm task (marked slow: bash scripts/test.sh
--slow): the checkpoint converts once and reloads, LoRA-GA initializes from the task's batches without a
``loss_fn`` and leaves the outputs unchanged, training on the task lowers the response loss, and the
exact match of the base model is measured by generation."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank_ablation import make_task

pytestmark = pytest.mark.slow

OPTIONS = {"data": "reasoning-gym:chain_sum", "data_options": {"min_terms": 2, "max_terms": 2, "max_digits": 2},
           "n_train": 256, "n_val": 32, "n_test": 32, "init_batches": 2, "max_length": 64, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def task():
    return make_task("causal-lm", OPTIONS)


def test_checkpoint_is_the_instruct_model_with_its_chat_tokens(task):
    tok = task.tok
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    built = task.build(0, 8)
    model = built.model
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(model.model.layers) == 30
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                                              add_generation_prompt=True)


def test_lora_ga_from_task_batches_then_training_lowers_the_loss(task):
    built = task.build(0, 8)
    model, probe = built.model, built.val_batches[0]
    keys = ("input_ids", "attention_mask", "labels")
    with torch.no_grad():
        before = model(**{k: probe[k] for k in keys})
    cfg = lowrank.LoRAConfig(rank=8, alpha=16, scaling="rslora", targets=built.targets, init="lora_ga",
                             init_options={"progress": False})
    lowrank.inject(model, cfg, data=built.init_batches, progress=False)  # model(**batch).loss: no loss_fn
    assert len(list(lowrank.adapted_layers(model))) == 210
    with torch.no_grad():
        after = model(**{k: probe[k] for k in keys})
    assert torch.allclose(after.logits, before.logits, atol=2e-3)  # W0 - s B0 A0 + s B0 A0: same outputs
    start = task.evaluate(model, built.val_batches)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    for _ in range(8):
        loss = model(**next(built.train)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = task.evaluate(model, built.val_batches)
    assert end["loss"] < start["loss"]
    assert 0.0 <= start["exact_match"] <= 1.0 and 0.0 <= end["exact_match"] <= 1.0
