"""Shared fixtures: tiny transformers models built from configs (no downloads) and model snapshots."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

VOCAB = 97


def tiny_bert(num_labels: int = 3, dtype=torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def tiny_gpt2(dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def random_base(d_out: int, d_in: int, generator: torch.Generator, conv1d: bool = False) -> torch.nn.Module:
    """An ``nn.Linear`` (or GPT-2's ``Conv1D``) of ``(d_out, d_in)`` with standard normal weight and bias."""
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(d_out, d_in)
    else:
        base = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=generator))
        base.bias.copy_(torch.randn(base.bias.shape, generator=generator))
    return base


# name -> (factory, targets, trainable, batch maker)
def _cls_batch(g: torch.Generator, bsz: int = 4, seq: int = 9) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (bsz, seq), generator=g),
            "attention_mask": torch.ones(bsz, seq, dtype=torch.long),
            "labels": torch.randint(0, 3, (bsz,), generator=g)}


def _lm_batch(g: torch.Generator, bsz: int = 4, seq: int = 9) -> dict:
    ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


MODELS = {
    "bert": (tiny_bert, ["query", "value", "dense"], ["classifier"], _cls_batch),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], [], _lm_batch),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], [], _lm_batch),
}


def batches(kind: str, n: int = 3, seed: int = 0, **kw) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [MODELS[kind][3](g, **kw) for _ in range(n)]


@pytest.fixture(params=list(MODELS))
def tiny(request):
    """``(kind, model, targets, trainable)`` for each tiny architecture."""
    factory, targets, trainable, _ = MODELS[request.param]
    return request.param, factory(), targets, trainable


class Snapshot:
    """Everything ``inject`` promises to leave unchanged on failure."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = [(n, m) for n, m in model.named_modules()]
        self.params = [(n, p, p.data, p.data.clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()]
        self.training = [(n, m.training) for n, m in model.named_modules()]
        self.attrs = set(vars(model))

    def assert_unchanged(self) -> None:
        now = list(self.model.named_modules())
        assert [n for n, _ in now] == [n for n, _ in self.modules], "module tree changed"
        assert all(a is b for (_, a), (_, b) in zip(now, self.modules)), "a module object was replaced"
        params = list(self.model.named_parameters())
        assert [n for n, _ in params] == [n for n, *_ in self.params]
        for (name, p), (_, p0, data0, clone0, flag0, grad0) in zip(params, self.params):
            assert p is p0, f"parameter {name} replaced"
            assert p.data.data_ptr() == data0.data_ptr(), f"weight tensor of {name} replaced"
            assert torch.equal(p.data, clone0), f"weight {name} changed"
            assert p.requires_grad == flag0, f"requires_grad of {name} changed"
            assert p.grad is grad0, f".grad of {name} changed"
        assert [(n, m.training) for n, m in self.model.named_modules()] == self.training
        assert set(vars(self.model)) == self.attrs, "attributes added to the model"


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    """A folder with a tiny random Llama (2 layers, hidden 32, tied embeddings) and the real SmolLM2 tokenizer
    (read from the offline GGUF file), loadable with ``from_pretrained``: the causal-lm task's test model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowrank_ablation.data import smollm2

    tok = AutoTokenizer.from_pretrained(smollm2.gguf_folder(), gguf_file=smollm2.GGUF)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
