"""The gradient estimator: the true mean over batches, float32, nothing left behind, clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import lowrank
from lowrank import LoRAConfig
from lowrank.weights import weight_view
from lowrank.init.gradient import estimate_gradients

from .conftest import MODELS, Snapshot, batches, tiny_bert


def _targets(model, names):
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names}


def _reference_mean_gradient(model, modules, data):
    """Plain autograd, one batch at a time: mean over batches of dL_b/dW (float64 accumulation)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    total = {n: 0.0 for n in modules}
    for batch in data:
        for m in modules.values():
            m.weight.grad = None
        model(**batch).loss.backward()
        for n, m in modules.items():
            g = m.weight.grad.T if isinstance(m, Conv1D) else m.weight.grad  # as (d_out, d_in)
            total[n] = total[n] + g.double()
    for m in modules.values():
        m.weight.grad = None
        m.weight.requires_grad_(True)
    return {n: t / len(data) for n, t in total.items()}


def _loss_mean(model, batch):
    return model(**batch).loss


def _loss_zeroes_grads(model, batch):
    model.zero_grad(set_to_none=False)  # a caller habit that must not matter
    return model(**batch).loss


def _loss_two_backwards(model, batch):
    """Backward on the two halves of the batch inside the loss function (gradient accumulation)."""
    half = len(batch["input_ids"]) // 2
    total = 0.0
    for part in (slice(0, half), slice(half, None)):
        sub = {k: v[part] for k, v in batch.items()}
        loss = model(**sub).loss * (len(sub["input_ids"]) / len(batch["input_ids"]))
        loss.backward()
        total = total + loss.detach()
    return total


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("loss_fn", [_loss_mean, _loss_zeroes_grads, _loss_two_backwards])
def test_estimate_equals_true_mean_gradient(kind, loss_fn):
    factory, targets, _, _ = MODELS[kind]
    data = batches(kind, 3, bsz=4)
    model = factory(dtype=torch.float64)
    modules = _targets(model, targets)
    ref_model = factory(dtype=torch.float64)
    want = _reference_mean_gradient(ref_model, _targets(ref_model, targets), data)
    got = estimate_gradients(model, modules, data, loss_fn, progress=False)
    assert set(got) == set(want)
    for n in got:
        assert got[n].dtype == torch.float32 and got[n].shape == weight_view(modules[n]).shape
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-7 * want[n].abs().max().item())


def test_mean_is_over_batches_not_backward_calls():
    """Two backward calls per batch must not halve G (PEFT's pitfall)."""
    data = batches("bert", 2)
    m1, m2 = tiny_bert(), tiny_bert()
    g1 = estimate_gradients(m1, _targets(m1, ["query"]), data, _loss_mean, progress=False)
    g2 = estimate_gradients(m2, _targets(m2, ["query"]), data, _loss_two_backwards, progress=False)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-7)


def test_bfloat16_model_accumulates_in_float32():
    data = batches("bert", 4)
    m16, m32 = tiny_bert(dtype=torch.bfloat16), tiny_bert()
    g16 = estimate_gradients(m16, _targets(m16, ["value"]), data, _loss_mean, progress=False)
    g32 = estimate_gradients(m32, _targets(m32, ["value"]), data, _loss_mean, progress=False)
    for n in g16:
        assert g16[n].dtype == torch.float32
        rel = (g16[n] - g32[n]).norm() / g32[n].norm()
        assert rel < 0.1, f"{n}: bf16 estimate off by {rel:.3f}"


def test_nothing_left_behind():
    model = tiny_bert()
    model.bert.encoder.layer[0].train()  # a mixed train/eval state to restore
    model.classifier.weight.requires_grad_(False)
    snap = Snapshot(model)
    rng = torch.get_rng_state()
    modules = _targets(model, ["query", "value"])
    estimate_gradients(model, modules, batches("bert", 2), _loss_mean, train_mode=True, progress=False)
    snap.assert_unchanged()  # flags, .grad (None), modes, modules, weights
    assert torch.equal(torch.get_rng_state(), rng)
    _assert_no_lowrank_hooks(model)


def test_offload_gives_the_same_estimate():
    data = batches("bert", 2)
    m = tiny_bert()
    mods = _targets(m, ["query"])
    a = estimate_gradients(m, mods, data, _loss_mean, progress=False)
    b = estimate_gradients(m, mods, data, _loss_mean, offload=True, progress=False)
    for n in a:
        assert b[n].device.type == "cpu"
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


# -- bad input through inject: clear error, model unchanged -----------------------------------------
def _inject_fails(match, exc=ValueError, data=None, loss_fn=None, **cfg):
    model = tiny_bert()
    snap = Snapshot(model)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=match):
        lowrank.inject(model, LoRAConfig(**{"targets": ["query", "value"], "rank": 2, "init": "lora_ga",
                                            "scaling": "rslora", **cfg}), data=data, loss_fn=loss_fn, progress=False)
    snap.assert_unchanged()
    assert torch.equal(torch.get_rng_state(), rng)
    _assert_no_lowrank_hooks(model)


def _assert_no_lowrank_hooks(model):
    """transformers may add hooks of its own (output capturing); none of ours may stay."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks):
            assert not [h for h in hooks.values() if "_Pass." in getattr(h, "__qualname__", "")]


def test_no_data():
    _inject_fails(r"data-driven: pass data=<iterable of batches>.*loss_fn=")


def test_empty_and_too_few_batches():
    _inject_fails("data gave no batches", data=[])
    _inject_fails(r"data gave only 2 batches but num_batches=5", data=batches("bert", 2),
                  init_options={"num_batches": 5})


def test_unreached_layers_are_named():
    def first_layer_only(model, batch):
        out = model.bert(input_ids=batch["input_ids"], output_hidden_states=True)
        return out.hidden_states[1].pow(2).mean()

    _inject_fails(r"does not reach 2 target layer\(s\).*'bert.encoder.layer.1.attention.self.query'",
                  data=batches("bert", 1), loss_fn=first_layer_only)


def test_non_finite_loss_names_the_batch():
    def nan_on_second(model, batch, calls=[]):  # noqa: B006 - counts calls
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("nan") if len(calls) == 2 else loss

    _inject_fails(r"non-finite loss nan on batch 1", exc=FloatingPointError, data=batches("bert", 3),
                  loss_fn=nan_on_second)


def test_non_finite_gradient_names_batch_and_layer():
    def sqrt_at_zero(model, batch):  # finite loss (0), NaN gradient
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return torch.sqrt(((logits - logits.detach()) ** 2).sum())

    _inject_fails(r"non-finite gradient on batch 0 for layer 'bert.encoder.layer.\d.attention.self.(query|value)'",
                  exc=FloatingPointError, data=batches("bert", 2), loss_fn=sqrt_at_zero)


def test_rank_too_large_for_lora_ga_names_layer_and_limit():
    _inject_fails(r"2r <= min\(d_out, d_in\), but r=17 and layer 'bert.encoder.layer.0.attention.self.query' is "
                  r"32 x 32; the largest valid rank is 16", data=batches("bert", 1), rank=17)


def test_standard_scaling_warns_for_lora_ga():
    model = tiny_bert()
    with pytest.warns(UserWarning, match="rsLoRA scaling"):
        lowrank.inject(model, LoRAConfig(targets=["query"], rank=2, init="lora_ga"), data=batches("bert", 1),
                       progress=False)


class _Sentinel:
    pass


class _Hold(torch.autograd.Function):
    """Identity whose graph node holds an object: it dies exactly when the graph is freed."""

    @staticmethod
    def forward(ctx, x, obj):
        ctx.obj = obj
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def test_each_batch_graph_is_freed_before_the_next_batch():
    """The graph of a batch (whose hooks hold every target layer's input) must not live on until
    the next batch's forward: that would hold two batches of activations at once."""
    import weakref

    model = tiny_bert()
    modules = _targets(model, ["query"])
    refs, alive = [], []

    def loss_fn(m, batch):
        alive.extend(r() is not None for r in refs)
        refs.clear()
        obj = _Sentinel()
        refs.append(weakref.ref(obj))
        return _Hold.apply(m(**batch).loss, obj)

    estimate_gradients(model, modules, batches("bert", 3), loss_fn, progress=False)
    assert alive == [False, False]
