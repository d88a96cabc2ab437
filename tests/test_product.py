"""The LoRA product ``s B A drop(x)`` (lowrank.adapters.product): the dropout law, every product order against a
float64 reference built with the same mask, the LoRA layer's dropout-free path unchanged bit for bit, and what
backward keeps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.lora import LoRALayer
from lowrank.adapters.product import ORDERS, SKINNY_RANK, choose_order, costs, drop_positions, lora_product

CPU = torch.device("cpu")


def _mask(numel: int, p: float, seed: int, shape) -> torch.Tensor:
    pos = drop_positions(numel, p, CPU, torch.Generator().manual_seed(seed))
    keep = torch.ones(numel, dtype=torch.float64)
    keep[pos] = 0
    return keep.view(shape)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_drop_positions_are_a_bernoulli_process(p):
    n = 400_000
    pos = drop_positions(n, p, CPU, torch.Generator().manual_seed(1))
    assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all()) and 0 <= int(pos[0]) and int(pos[-1]) < n
    sd = math.sqrt(n * p * (1 - p))
    assert abs(len(pos) - n * p) < 5 * sd  # the drop rate
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[pos] = True
    both = (dropped[1:] & dropped[:-1]).double().mean().item()  # neighbours independent: P(both) = p^2
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n) + 1e-4
    gaps = torch.diff(pos)
    assert abs((gaps == 1).double().mean().item() - p) < 0.02  # Geometric(p): P(gap = 1) = p
    again = drop_positions(n, p, CPU, torch.Generator().manual_seed(1))
    assert torch.equal(pos, again)  # a generator's seed fixes the mask


def test_drop_positions_cover_the_tensor_end_to_end():
    # tiny tensors and tiny rates go through the top-up loop as often as not; the law holds at the tail too
    counts = torch.zeros(50)
    for seed in range(4000):
        pos = drop_positions(50, 0.02, CPU, torch.Generator().manual_seed(seed))
        counts[pos] += 1
    assert abs(counts[-10:].mean().item() / 4000 - 0.02) < 0.006 and abs(counts[:10].mean().item() / 4000 - 0.02) < 0.006


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("rank", [3, SKINNY_RANK + 2])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_every_order_equals_the_float64_reference_with_the_same_mask(order, rank, p):
    torch.manual_seed(0)
    N, n, m, s = 37, 80, 70, 1.7
    x = torch.randn(2, N, n, dtype=torch.float64, requires_grad=True)
    A = torch.randn(rank, n, dtype=torch.float64, requires_grad=True)
    B = torch.randn(m, rank, dtype=torch.float64, requires_grad=True)
    y = lora_product(x, A, B, s, p, order=order, generator=torch.Generator().manual_seed(7))
    keep = _mask(x.numel(), p, 7, x.shape) if p else torch.ones_like(x)
    ref = s * F.linear(F.linear(keep * x / (1 - p), A), B)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, A, B), g)
    want = torch.autograd.grad(ref, (x, A, B), g)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, b, name in zip(got, want, "xAB"):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11, msg=f"d{name}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_matches_the_reference(dtype, tol):
    torch.manual_seed(1)
    x64, A64, B64 = torch.randn(64, 48, dtype=torch.float64), torch.randn(8, 48, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    x, A, B = (t.to(dtype).requires_grad_() for t in (x64, A64, B64))
    y = lora_product(x, A, B, 0.5, 0.1, generator=torch.Generator().manual_seed(3))
    assert y.dtype == dtype
    keep = _mask(x.numel(), 0.1, 3, x.shape)
    xs, As, Bs = (t.detach().double().requires_grad_() for t in (x, A, B))
    ref = 0.5 * F.linear(F.linear(keep * xs / 0.9, As), Bs)
    scale = ref.abs().max()
    assert (y.double() - ref).abs().max() <= tol * scale
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, (x, A, B), g.to(dtype)), torch.autograd.grad(ref, (xs, As, Bs), g)):
        assert (a.double() - b).abs().max() <= tol * b.abs().max()


def test_keep_rate_and_scaling():
    # A = B = I, s = 1: the product is drop(x) itself and d(sum)/dx is the scaled keep mask
    n, p = 64, 0.25
    x = torch.ones(500, n, requires_grad=True)
    y = lora_product(x, torch.eye(n), torch.eye(n), 1.0, p, generator=torch.Generator().manual_seed(0))
    values = torch.unique(y)
    assert len(values) == 2 and values[0] == 0 and values[1] == torch.tensor(1 / (1 - p), dtype=torch.float32)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, y.detach())  # the mask of backward is the mask of forward
    assert abs((y == 0).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / y.numel())


def test_costs_and_order_choice():
    N, n, m, r = 1024, 576, 576, 8
    assert costs(N, n, m, r) == {"factored": N * r * (n + m) + N * r * n, "dense": 2 * (m * n * r + N * m * n) + N * n * r}
    assert choose_order(N, n, m, r) == "factored" and choose_order(N, n, m, 128) == "factored"
    assert choose_order(4096, 64, 64, 64) == "factored"  # even at the layer's width
    assert choose_order(4096, 64, 64, 100) == "dense"  # a rank above the widths' harmonic mean, many tokens
    assert choose_order(1, 64, 64, 100) == "factored"  # one token: forming B A never pays


def test_bad_input_is_named():
    x, A, B = torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match="invalid order='merged'"):
        lora_product(x, A, B, 1.0, order="merged")
    with pytest.raises(ValueError, match="invalid dropout p=1.0"):
        lora_product(x, A, B, 1.0, p=1.0)


def _layer(dropout: float, rank: int = 4, d_in: int = 24, d_out: int = 20) -> LoRALayer:
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(d_in, d_out), rank, 8.0, 2.0, dropout=dropout)
    with torch.no_grad():
        layer.A.normal_()
        layer.B.normal_()
    layer.base_layer.requires_grad_(False)
    return layer


def test_layer_without_dropout_is_todays_computation_bit_for_bit():
    layer = _layer(0.0).train()
    x = torch.randn(3, 10, 24, requires_grad=True)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_()
    A, B = (t.detach().clone().requires_grad_() for t in (layer.A, layer.B))
    ref = layer.base_layer(ref_x) + F.linear(F.linear(ref_x, A), B) * layer.scaling
    g = torch.randn_like(y)
    assert torch.equal(y, ref)
    for a, b in zip(torch.autograd.grad(y, (x, layer.A, layer.B), g), torch.autograd.grad(ref, (ref_x, A, B), g)):
        assert torch.equal(a, b)


def test_layer_dropout_follows_the_global_seed_and_eval_turns_it_off():
    layer = _layer(0.2).train()
    x = torch.randn(4, 6, 24)
    torch.manual_seed(5)
    y1 = layer(x)
    torch.manual_seed(5)
    y2 = layer(x)
    torch.manual_seed(5)
    pos = drop_positions(x.numel(), 0.2, CPU)  # the draw the layer made
    assert torch.equal(y1, y2) and not torch.equal(y1, layer(x))
    keep = torch.ones(x.numel())
    keep[pos] = 0
    ref = layer.base_layer(x) + layer.scaling * F.linear(F.linear(keep.view(x.shape) * x / 0.8, layer.A), layer.B)
    torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling * F.linear(F.linear(x, layer.A), layer.B))


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(seen.values())


def test_dropout_keeps_no_copy_of_the_input():
    x = torch.randn(64, 32, 96, requires_grad=True)
    plain = _saved_bytes(_layer(0.0, d_in=96, d_out=96).train(), x)
    ours = _saved_bytes(_layer(0.05, d_in=96, d_out=96).train(), x)
    peft_like = _saved_bytes(_PeftLike(_layer(0.05, d_in=96, d_out=96).train()), x)  # nn.Dropout, as PEFT
    assert ours <= 1.05 * plain, (ours, plain)
    assert peft_like >= plain + 0.9 * x.numel() * 4  # a dropped float copy of x


class _PeftLike(nn.Module):
    def __init__(self, layer: LoRALayer):
        super().__init__()
        self.layer, self.drop = layer, nn.Dropout(0.05)

    def forward(self, x):
        lay = self.layer
        return lay.base_layer(x) + F.linear(F.linear(self.drop(x), lay.A), lay.B) * lay.scaling


def test_compiled_layer_with_dropout_trains():
    layer, eager = _layer(0.1).train(), _layer(0.1).train()
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(5, 24)
    torch.manual_seed(3)
    y = compiled(x)
    y.sum().backward()
    torch.manual_seed(3)
    y_eager = eager(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(layer.A.grad, eager.A.grad)
    torch.testing.assert_close(layer.B.grad, eager.B.grad)
