"""The LoRA layer: forward formula, layouts, merge/unmerge, offset bookkeeping."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank import LoRALayer
from lowrank.weights import apply_offset, original_weight


def _layer(base, rank=3, alpha=6.0, scaling=2.0):
    layer = LoRALayer(base, rank, alpha, scaling)
    g = torch.Generator().manual_seed(1)
    layer.set_factors(torch.randn(layer.A.shape, generator=g), torch.randn(layer.B.shape, generator=g))
    return layer


def _bases():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    conv = Conv1D(5, 7)  # nf=d_out=5, nx=d_in=7; weight stored (7, 5)
    return {"linear": lin, "conv1d": conv}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_Wx_plus_sBAx(kind):
    base = _bases()[kind]
    layer = _layer(base)
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    layer = layer.double()
    W = base.weight.T if kind == "conv1d" else base.weight  # (m, n)
    want = x @ W.T + base.bias + 2.0 * (x @ layer.A.T @ layer.B.T)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    assert layer.base_weight().shape == (5, 7)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.B @ layer.A)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    base = _bases()[kind]
    layer = _layer(base)
    x = torch.randn(3, 7)
    y = layer(x)
    w_before = base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base_weight(), (w_before.T if kind == "conv1d" else w_before) + layer.delta_weight())
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, w_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)


def test_offset_preserves_output_and_restores_w0():
    base = _bases()["linear"]
    w0 = base.weight.detach().clone()
    layer = _layer(base)
    x = torch.randn(3, 7)
    y0 = nn.functional.linear(x, w0, base.bias)
    old = apply_offset(layer)
    assert old is not base.weight.data and layer.offset
    torch.testing.assert_close(base.weight, w0 - 2.0 * layer.B @ layer.A)
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(original_weight(layer), w0, rtol=0, atol=1e-6)


def test_dropout_only_on_adapter_path_and_dtype_kept():
    base = nn.Linear(7, 5).to(torch.bfloat16)
    layer = LoRALayer(base, 2, 4.0, 2.0, dropout=0.5)
    assert layer.A.dtype == layer.B.dtype == torch.bfloat16
    layer.eval()
    x = torch.randn(3, 7, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), base(x))  # B = 0


def test_rejects_unsupported_module():
    with pytest.raises(TypeError, match="cannot wrap Embedding"):
        LoRALayer(nn.Embedding(4, 4), 1, 1.0, 1.0)
