"""4-bit (bitsandbytes NF4) bases: a tiny Llama loaded with transformers' ``BitsAndBytesConfig`` (the QLoRA path),
against its dense twin, a float Llama whose weights are the 4-bit model's ``deq(Q)``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank import LoRAConfig
from lowrank.plan import adapted_layers
from lowrank import quantization_errors
from lowrank.quant import autograd_4bit, dequantized, is_4bit, nf4_roundtrip
from lowrank.theory import alignment

from .conftest import VOCAB, batches

bnb = pytest.importorskip("bitsandbytes")  # in the dev extra: CI has it; the skip is for a bare install only

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK = 4


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama, hidden 64 (bitsandbytes' CPU repacking needs in_features divisible by its block size, 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama4")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def load_4bit(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                     dtype=torch.float32)
    with torch.no_grad():  # an eval forward without gradients: where bitsandbytes repacks weights on such CPUs
        model.eval()(torch.arange(8)[None])
    return model


def dense_twin(model: nn.Module, path: str) -> nn.Module:
    """A float copy of a 4-bit model: every Linear4bit's weight replaced by deq(Q)."""
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if is_4bit(module):
                twin.get_submodule(name).weight.copy_(dequantized(module).float())
    return twin.eval()


def logits(model, ids):
    """Through bitsandbytes' float32 path: its eval kernel on AVX512-BF16 CPUs (used once it repacked a weight)
    computes in bf16, which would hide float32-level differences."""
    with autograd_4bit(model), torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def data():
    return batches("llama", n=2)


def cfg(init, **kw):
    opts = {"progress": False} if init in ("lora_ga", "lora_one", "gora") else {}
    return LoRAConfig(rank=RANK, targets=TARGETS, init=init, init_options=opts, **kw)


def test_model_is_4bit(llama_dir):
    model = load_4bit(llama_dir)
    assert is_4bit(model.model.layers[0].self_attn.q_proj)
    assert lowrank.adapters.base.weight_shape(model.model.layers[0].mlp.down_proj) == (64, 128)


@pytest.mark.parametrize("init", ["kaiming", "orthogonal"])
def test_no_offset_init_keeps_the_output(llama_dir, init):
    model = load_4bit(llama_dir)
    ids = torch.arange(9)[None]
    before = logits(model, ids)
    lowrank.inject(model, cfg(init))
    after = logits(model, ids)
    assert torch.equal(after, before) if init == "kaiming" else torch.allclose(after, before, atol=1e-6)  # B A = 0
    assert quantization_errors(model) == {}


def test_lora_ga_first_step_is_the_theorem_for_the_dequantized_gradient(llama_dir, data):
    model = load_4bit(llama_dir)
    twin = dense_twin(model, llama_dir)
    names = [n for n, m in twin.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS]
    grads = {n: torch.zeros_like(twin.get_submodule(n).weight) for n in names}
    twin.train()
    for b in data:  # the mean over batches of each batch's gradient, as lowrank estimates G
        twin.zero_grad()
        twin(**b).loss.backward()
        for n in names:
            grads[n] += twin.get_submodule(n).weight.grad / len(data)
    lowrank.inject(model, cfg("lora_ga"), data=data)
    for name, layer in adapted_layers(model):
        a = alignment(layer.A, layer.B, layer.scaling, grads[name])
        assert a.rel_error_2r < 1e-3, (name, a)  # D = zeta G_2r for the dequantized base's gradient


def test_pissa_factors_the_dequantized_weight_and_quantizes_the_residual(llama_dir):
    model = load_4bit(llama_dir)
    twin = dense_twin(model, llama_dir)
    lowrank.inject(twin, cfg("pissa"))
    w0 = {n: dequantized(m).float() for n, m in model.named_modules() if is_4bit(m)}
    lowrank.inject(model, cfg("pissa"))
    errors = quantization_errors(model)
    assert sorted(errors) == sorted(n for n, _ in adapted_layers(model))
    dense = dict(adapted_layers(twin))
    for name, layer in adapted_layers(model):
        assert torch.allclose(layer.A, dense[name].A, atol=1e-5) and torch.allclose(layer.B, dense[name].B, atol=1e-5)
        residual = w0[name] - layer.scaling * layer.B0 @ layer.A0
        assert is_4bit(layer.base_layer)
        assert torch.equal(dequantized(layer.base_layer).float(), nf4_roundtrip(residual))  # Q = quant(W0 - s B0 A0)
        want = torch.linalg.matrix_norm(residual - nf4_roundtrip(residual)) / torch.linalg.matrix_norm(residual)
        assert errors[name] == pytest.approx(float(want), rel=1e-5)
        assert 0 < errors[name] < 0.2


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.B.add_(0.05 * torch.randn(layer.B.shape, generator=g))


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_merge_is_a_dequantized_copy_and_unmerge_puts_the_4bit_layer_back(llama_dir, adapter):
    model = load_4bit(llama_dir)
    lowrank.inject(model, cfg("kaiming", adapter=adapter))
    perturb(model)
    ids = torch.arange(9)[None]
    before = logits(model, ids)
    bases = {n: layer.base_layer for n, layer in adapted_layers(model)}
    lowrank.merge(model)
    for n, layer in adapted_layers(model):
        assert type(layer.base_layer) is nn.Linear
        assert torch.allclose(layer.base_layer.weight, dequantized(bases[n]) + layer.delta_weight().detach(), atol=1e-6) \
            if adapter == "lora" else True
    assert torch.allclose(logits(model, ids), before, atol=1e-4)
    lowrank.unmerge(model)
    assert all(layer.base_layer is bases[n] for n, layer in adapted_layers(model))
    assert torch.equal(logits(model, ids), before)
    merged = lowrank.unload(copy.deepcopy(model), merge=True)  # merge_and_unload: the targets in full precision
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in bases)
    assert torch.allclose(logits(merged, ids), before, atol=1e-4)


def test_save_and_load_rebuild_the_quantized_residual_bit_for_bit(llama_dir, tmp_path):
    model = load_4bit(llama_dir)
    lowrank.inject(model, cfg("pissa"))
    perturb(model)
    lowrank.save_adapter(model, tmp_path / "a")
    fresh = lowrank.load_adapter(load_4bit(llama_dir), tmp_path / "a")
    ids = torch.arange(9)[None]
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    for (_, a), (_, b) in zip(adapted_layers(model), adapted_layers(fresh)):
        assert torch.equal(a.base_layer.weight.data, b.base_layer.weight.data)


def test_peft_export_loads_on_the_4bit_base(llama_dir, tmp_path):
    from peft import PeftModel

    model = load_4bit(llama_dir)
    lowrank.inject(model, cfg("kaiming"))
    perturb(model)
    lowrank.peft.export(model, tmp_path / "p")
    peft_model = PeftModel.from_pretrained(load_4bit(llama_dir), tmp_path / "p")
    ids = torch.arange(9)[None]
    assert torch.allclose(logits(peft_model, ids), logits(model, ids), atol=1e-5)


def test_peft_export_of_a_quantized_offset_warns_with_the_error(llama_dir, tmp_path):
    model = load_4bit(llama_dir)
    lowrank.inject(model, cfg("pissa"))
    with pytest.warns(UserWarning, match="quantization error"):
        lowrank.peft.export(model, tmp_path / "p")


def test_loftq_on_a_4bit_layer_is_refused_and_the_model_unchanged(llama_dir):
    from .conftest import Snapshot

    model = load_4bit(llama_dir)
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*already 4-bit.*quantize_base"):
        lowrank.inject(model, cfg("loftq"))
    snap.assert_unchanged()
