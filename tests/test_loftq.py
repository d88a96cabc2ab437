"""LoftQ (arXiv 2310.08659) against a float64 reference of Algorithm 1 written here (numpy SVD; the quantizer is
bitsandbytes' NF4, the paper's), and the objective it is for: ``||W0 - deq(Q) - s B A||`` below plain NF4's
``||W0 - deq(quant(W0))||`` on every layer once the base is quantized."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from lowrank import LoRAConfig
from lowrank.plan import adapted_layers
from lowrank import quantize_base
from lowrank.quant import dequantized, is_4bit, nf4_roundtrip

from .conftest import Snapshot

pytest.importorskip("bitsandbytes")  # in the dev extra: CI has it

TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama(hidden=64, inter=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def reference(W0: np.ndarray, r: int, s: float, T: int):
    """Algorithm 1 in float64 (quant from bitsandbytes in float32, as the weight is stored): ``(deq(Q_T), s B_T A_T,
    s B_{T-1} A_{T-1})``."""
    low_prev = np.zeros_like(W0)
    for t in range(T):
        q = nf4_roundtrip(torch.from_numpy(W0 - low_prev).float()).double().numpy()
        U, S, Vt = np.linalg.svd(W0 - q, full_matrices=False)
        low = (U[:, :r] * S[:r]) @ Vt[:r]
        if t + 1 < T:
            low_prev = low
    return q, low, low_prev


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_matches_the_float64_reference(T, scaling):
    model = llama()
    W0 = {n: m.weight.detach().double().numpy().copy() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    cfg = LoRAConfig(rank=4, alpha=8, scaling=scaling, targets=TARGETS, init="loftq", init_options={"num_iter": T})
    lowrank.inject(model, cfg)
    for name, layer in adapted_layers(model):
        q, low, low_prev = reference(W0[name], 4, layer.scaling, T)
        s = layer.scaling
        got_low = s * (layer.B.detach().double() @ layer.A.detach().double()).numpy()
        got_prev = s * (layer.B0.double() @ layer.A0.double()).numpy()
        assert np.abs(got_low - low).max() < 1e-5 * max(1.0, np.abs(low).max()), name
        assert np.abs(got_prev - low_prev).max() < 1e-5, name
        # the base is offset by the previous iterate; it quantizes to Q_T
        base = layer.base_layer.weight.detach().double().numpy()
        assert np.abs(base - (W0[name] - low_prev)).max() < 1e-6
        assert np.abs(nf4_roundtrip(layer.base_layer.weight).double().numpy() - q).max() < 1e-6


def test_quantized_base_beats_plain_nf4_on_every_layer():
    model = llama()
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    errors = {}
    for T in (1, 3):
        m = llama()
        lowrank.inject(m, LoRAConfig(rank=8, targets=TARGETS, init="loftq", init_options={"num_iter": T}))
        quantize_base(m)
        for name, layer in adapted_layers(m):
            assert is_4bit(layer.base_layer)
            loftq = torch.linalg.matrix_norm(W0[name] - dequantized(layer.base_layer) - layer.delta_weight().detach())
            plain = torch.linalg.matrix_norm(W0[name] - nf4_roundtrip(W0[name]))
            errors[T, name] = float(loftq / plain)
    assert all(v < 0.95 for v in errors.values()), errors  # measured 0.61-0.84 at r=8 (T=1)
    assert all(errors[3, n] < errors[1, n] for (_, n) in errors), errors  # more alternations, lower error


def test_quantize_base_reproduces_q_t_and_trains():
    model = llama()
    lowrank.inject(model, LoRAConfig(rank=4, targets=TARGETS, init="loftq", init_options={"num_iter": 2}))
    want = {n: nf4_roundtrip(layer.base_layer.weight) for n, layer in adapted_layers(model)}
    quantize_base(model)
    for name, layer in adapted_layers(model):
        assert torch.equal(dequantized(layer.base_layer).float(), want[name])
        assert 0 < layer.base_layer.quantization_error < 0.2
    ids = torch.arange(9)[None]
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = [layer.A.grad for _, layer in adapted_layers(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_save_load_and_peft_export_on_the_full_precision_model(tmp_path):
    from peft import PeftModel

    model = llama()
    lowrank.inject(model, LoRAConfig(rank=4, targets=TARGETS, init="loftq", init_options={"num_iter": 3}))
    ids = torch.arange(9)[None]
    with torch.no_grad():
        out = model(ids).logits
    lowrank.save_adapter(model, tmp_path / "a")
    fresh = lowrank.load_adapter(llama(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
    lowrank.peft.export(model, tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(PeftModel.from_pretrained(llama(), tmp_path / "p")(ids).logits, out, atol=1e-5)


def test_bad_options_and_missing_bitsandbytes(monkeypatch):
    for bad in ({"num_iter": 0}, {"quant_type": "int3"}, {"blocksize": 48}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            LoRAConfig(targets=TARGETS, init="loftq", init_options=bad).make_initializer()
    model = llama()
    snap = Snapshot(model)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match=r"loftq.*q_proj.*pip install 'lowrank\[quant\]'"):
        lowrank.inject(model, LoRAConfig(rank=4, targets=TARGETS, init="loftq"))
    snap.assert_unchanged()


def test_a_plugin_variant_of_loftq_declares_its_quantization_too():
    """quantize_base asks the initializer which 4-bit settings it needs (``Initializer.quantization``), so a
    user's LoftQ subclass under another name gets its own block size, not the NF4-64 default."""
    from lowrank.init.loftq import LoftQ

    @lowrank.register_initializer("lab_loftq")
    class LabLoftQ(LoftQ):
        """A user's LoftQ variant."""

    try:
        model = llama()
        lowrank.inject(model, LoRAConfig(rank=4, targets=TARGETS, init="lab_loftq",
                                         init_options={"num_iter": 1, "blocksize": 128}))
        want = {n: nf4_roundtrip(layer.base_layer.weight, 128) for n, layer in adapted_layers(model)}
        quantize_base(model)
        assert all(layer.base_layer.weight.quant_state.blocksize == 128 for _, layer in adapted_layers(model))
        assert all(torch.equal(dequantized(layer.base_layer).float(), want[n]) for n, layer in adapted_layers(model))
        assert lowrank.get_initializer("kaiming")().quantization() is None  # the default declares nothing
    finally:
        lowrank.registry.INITIALIZERS.unregister("lab_loftq")
