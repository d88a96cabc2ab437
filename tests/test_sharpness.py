"""``lowrank.theory.sharpness`` against the exact Hessian (``torch.autograd.functional.hessian``) on
small models, plain and Adam-preconditioned; ``transfer_lr`` and its measurements: exact
properties, the model left as it was, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lowrank
from lowrank.theory import Arm, FullFineTune, sharpness, transfer_lr
from lowrank.theory.transfer import RULES, measure

from .conftest import Snapshot, batches, tiny_bert


class MLP(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 10).to(dtype), nn.Linear(10, 4).to(dtype)

    def forward(self, x, y):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return type("Out", (), {"loss": (out - y).pow(2).mean(), "logits": out})()


def mlp_batches(n=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(8, 6, generator=g, dtype=dtype), "y": torch.randn(8, 4, generator=g, dtype=dtype)}
            for _ in range(n)]


def mlp(init="gaussian", **opts):
    """Adapters on both layers; with ``kaiming`` (``B = 0``) adapters on ``fc1`` and ``fc2`` trained in full."""
    model = MLP()
    head = init == "kaiming"
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["fc1"] if head else ["fc1", "fc2"], init=init,
                                             init_options=opts, trainable=["fc2"] if head else ()))
    return model


def bert():
    model = tiny_bert(dtype=torch.float64)
    lowrank.inject(model, lowrank.LoRAConfig(rank=1, targets=["query"], init="gaussian",
                                             init_options={"b_std": 0.05}, trainable=["classifier"]))
    return model


def exact_extreme(model, data, preconditioner):
    """Largest-magnitude eigenvalue of the dense (preconditioned) Hessian of the mean loss."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(flat):
        tensors, i = {}, 0
        for n, p in zip(names, params):
            tensors[n] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return sum(torch.func.functional_call(model, tensors, kwargs=b).loss for b in data) / len(data)

    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(loss, flat0)
        flat = flat0.clone().requires_grad_(True)
        g = torch.autograd.grad(loss(flat), flat)[0]
    if preconditioner == "adam":
        d = (g.abs() + 1e-8).rsqrt()
        H = d[:, None] * H * d[None, :]
    ev = torch.linalg.eigvalsh((H + H.T) / 2)
    return ev[ev.abs().argmax()].item()


@pytest.mark.parametrize("preconditioner", ["none", "adam"])
@pytest.mark.parametrize("case", ["mlp_gaussian", "mlp_kaiming_with_head", "bert"])
def test_sharpness_matches_the_exact_hessian(case, preconditioner):
    model, data = {"mlp_gaussian": lambda: (mlp(b_std=0.3), mlp_batches()),
                   "mlp_kaiming_with_head": lambda: (mlp("kaiming"), mlp_batches()),
                   "bert": lambda: (bert(), batches("bert", 2))}[case]()
    got = sharpness(model, data, num_batches=len(data), preconditioner=preconditioner)
    want = exact_extreme(model, data, preconditioner)
    assert got == pytest.approx(want, rel=1e-3), (got, want)


def test_sharpness_keeps_the_sign_of_a_negative_extreme_eigenvalue():
    """A quadratic ``L = w^T M w / 2`` with a known spectrum whose largest magnitude is negative."""
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    M = torch.tensor([[-5.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    quad = lambda m, batch: 0.5 * m.w @ M @ m.w  # noqa: E731
    assert sharpness(model, [None], quad) == pytest.approx(torch.linalg.eigvalsh(M)[0].item(), rel=1e-9)
    d = ((M @ model.w).abs().detach() + 1e-8).rsqrt()
    ev = torch.linalg.eigvalsh(d[:, None] * M * d[None, :])
    assert sharpness(model, [None], quad, preconditioner="adam") == pytest.approx(ev[ev.abs().argmax()].item())


def test_sharpness_leaves_the_model_exactly_as_it_was_and_is_deterministic():
    model = bert()
    model.train()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 7.0)
    snap = Snapshot(model)
    rng = torch.get_rng_state()
    data = batches("bert", 2)
    a = sharpness(model, data, num_batches=2, preconditioner="adam", iters=20, seed=3)
    snap.assert_unchanged()
    assert torch.equal(torch.get_rng_state(), rng)
    assert sharpness(model, data, num_batches=2, preconditioner="adam", iters=20, seed=3) == a
    assert all(m.training for m in model.modules())


def test_sharpness_float32_model_agrees_with_float64_reference():
    model = MLP(torch.float32)
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["fc1", "fc2"], init="gaussian",
                                             init_options={"b_std": 0.3}))
    data = mlp_batches(dtype=torch.float32)
    ref = exact_extreme(model.double(), [{k: v.double() for k, v in b.items()} for b in data], "none")
    model.float()
    assert sharpness(model, data, num_batches=2) == pytest.approx(ref, rel=1e-3)


def test_sharpness_bad_input_is_a_clear_error_and_the_model_is_unchanged():
    model = mlp(b_std=0.3)
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        sharpness(model, mlp_batches(), preconditioner="shampoo")
    with pytest.raises(ValueError, match="data gave only 2 batches but num_batches=3"):
        sharpness(model, mlp_batches(), num_batches=3)
    with pytest.raises(ValueError, match="iters must be a positive integer"):
        sharpness(model, mlp_batches(), iters=0)
    bad = mlp_batches()
    bad[0]["y"][0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite loss .* on batch 0"):
        sharpness(model, bad, num_batches=2)
    snap.assert_unchanged()
    frozen = MLP()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sharpness(frozen, mlp_batches())


# ---- transfer_lr -------------------------------------------------------------------------------

def fresh_bert():
    return tiny_bert(dtype=torch.float64)


def lora(alpha=8.0, targets=("query", "value"), **kw):
    return lowrank.LoRAConfig(rank=2, alpha=alpha, targets=list(targets), **kw)


@pytest.mark.parametrize("rule", RULES)
def test_transfer_of_the_reference_to_itself_is_the_identity(rule):
    out = transfer_lr(MLP, lora(targets=["fc1", "fc2"]), 1e-3,
                      {"same": lora(targets=["fc1", "fc2"]), "ft": FullFineTune()}, mlp_batches(), rule=rule,
                      sharpness_iters=10)
    assert out["same"] == pytest.approx(1e-3, rel=1e-12)
    assert out["ft"] > 0 and math.isfinite(out["ft"])


@pytest.mark.parametrize("rule", ["function", "loss", "directional"])
def test_doubling_alpha_halves_the_rate_of_first_order_rules(rule):
    """At ``B = 0`` Adam's first step moves only ``B`` (``grad_A = 0``), by ``-lr sign(grad_B)`` whatever
    ``s``; the change of ``s B A`` is then proportional to ``s``: the same function change needs half
    the rate at twice the scale. Each first-order rule must see exactly that."""
    out = transfer_lr(MLP, lora(8.0, ["fc1", "fc2"]), 1e-3, {"x2": lora(16.0, ["fc1", "fc2"])}, mlp_batches(),
                      rule=rule)
    assert out["x2"] == pytest.approx(5e-4, rel=1e-4)


def test_a_rule_that_predicts_no_rate_says_so():
    """Along Adam's first step the tiny random BERT's loss curves down: no line-search minimum."""
    with pytest.raises(FloatingPointError, match="rule 'directional' gives q = -.* it predicts no rate"):
        transfer_lr(fresh_bert, lora(), 1e-3, {"a": lora(alpha=4.0)}, batches("bert", 2), rule="directional")


def test_measure_restores_everything_even_for_an_optimizer_that_freezes_A():
    model = fresh_bert()
    lowrank.inject(model, lora(init="gaussian", init_options={"b_std": 0.05}))
    snap = Snapshot(model)
    rng = torch.get_rng_state()
    q = measure(model, Arm(lora(), preconditioner="lora_fa"), batches("bert", 2),
                rules=["function", "loss", "directional"])
    assert set(q) == {"function", "loss", "directional"} and all(math.isfinite(v) for v in q.values())
    assert q["loss"] > 0 and q["function"] > 0
    snap.assert_unchanged()
    assert torch.equal(torch.get_rng_state(), rng)


def test_transfer_bad_input():
    data = batches("bert", 2)
    with pytest.raises(ValueError, match="unknown rule 'edge'"):
        transfer_lr(fresh_bert, lora(), 1e-3, {"a": lora()}, data, rule="edge")
    for bad in (0.0, -1e-3, math.nan, True):
        with pytest.raises(ValueError, match="reference_lr must be a positive finite number"):
            transfer_lr(fresh_bert, lora(), bad, {"a": lora()}, data)
    everything = FullFineTune(frozen=("bert", "classifier"))
    with pytest.raises(ValueError, match="no trainable parameters"):
        transfer_lr(fresh_bert, lora(), 1e-3, {"a": everything}, data)
    def nan_on_second(model, batch):
        return model(**batch).loss * (math.nan if batch is data[1] else 1.0)

    with pytest.raises(FloatingPointError, match="non-finite loss nan on batch 1"):
        transfer_lr(fresh_bert, lora(), 1e-3, {"a": lora()}, data, nan_on_second)
    with pytest.raises(ValueError, match="full fine-tuning has no adapters to precondition"):
        transfer_lr(fresh_bert, lora(), 1e-3, {"a": Arm(FullFineTune(), preconditioner="riemannian")}, data)
