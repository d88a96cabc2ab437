"""The ``dora`` adapter (arXiv 2402.09353) against real PEFT DoRA: outputs and gradients of ``A``, ``B``
and ``m`` agree to 1e-5 relative on BERT, GPT-2 (``Conv1D``) and Llama, standard and rsLoRA, both
ways (``lowrank.peft.export`` -> PEFT, PEFT -> ``lowrank.peft.load``); the function it computes is the
paper's ``m * (W + s B A) / ||W + s B A||_row``; merge, save and load."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from tests.conftest import MODELS, batches

peft = pytest.importorskip("peft")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def trained_dora(kind: str, scaling: str, init: str = "gaussian"):
    factory, targets, trainable, _ = MODELS[kind]
    data = batches(kind, 2, seed=1)
    opts = {"b_std": 0.05, "offset": False} if init == "gaussian" else {}  # no offset: PEFT gets the same rank
    if lowrank.get_initializer(init).uses_data:
        opts["progress"] = False
    cfg = lowrank.LoRAConfig(rank=2, alpha=4, scaling=scaling, targets=targets, trainable=trainable, init=init,
                             init_options=opts, adapter="dora", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lowrank.inject(factory(), cfg, data=data, progress=False) if lowrank.get_initializer(init).uses_data \
            else lowrank.inject(factory(), cfg, progress=False)
    opt = torch.optim.SGD(lowrank.trainable_parameters(model).values(), lr=0.05)
    for b in data:  # move A, B and m away from their initial values
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    return model.eval(), factory


def grads(model, batch, names):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if n in names}


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_outputs_and_gradients_equal_peft_dora(kind, scaling, tmp_path):
    model, factory = trained_dora(kind, scaling)
    lowrank.peft.export(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(factory(), tmp_path, is_trainable=True).eval()
    assert pm.peft_config["default"].use_dora
    b = batches(kind, 1, seed=7)[0]
    with torch.no_grad():
        ours, theirs = model(**b).logits, pm(**b).logits
    assert rel(ours, theirs) <= 1e-5
    mine = {}
    for name, layer in lowrank.adapted_layers(model):
        mine.update({f"{name}.A": f"base_model.model.{name}.lora_A.default.weight",
                     f"{name}.B": f"base_model.model.{name}.lora_B.default.weight",
                     f"{name}.m": f"base_model.model.{name}.lora_magnitude_vector.default.weight"})
    g_ours, g_peft = grads(model, b, set(mine)), grads(pm, b, set(mine.values()))
    assert len(g_ours) == len(g_peft) == len(mine)
    for ours_name, peft_name in mine.items():
        assert rel(g_ours[ours_name], g_peft[peft_name]) <= 1e-5, ours_name
    # and back: PEFT's DoRA adapter loaded by lowrank
    pm.save_pretrained(tmp_path / "peft")
    back = lowrank.peft.load(factory(), tmp_path / "peft").eval()
    assert all(layer.registry_name == "dora" for _, layer in lowrank.adapted_layers(back))
    with torch.no_grad():
        assert rel(back(**b).logits, theirs) <= 1e-5


def test_offset_inits_export_to_peft_dora_on_the_original_base(tmp_path):
    model, factory = trained_dora("bert", "rslora", init="pissa")
    lowrank.peft.export(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    b = batches("bert", 1, seed=7)[0]
    with torch.no_grad():
        assert rel(model(**b).logits, pm(**b).logits) <= 1e-5


def test_dora_is_the_papers_function_and_its_norm_is_a_constant():
    """y = W' x + b with W' = m (W + s B A) / ||W + s B A||_row; d y / d m is the direction, and the gradient
    of A and B equals that of the formula with the norm detached (Sec. 4.3)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(7, 5).double()
    layer = lowrank.get_adapter("dora")(base, rank=2, alpha=4.0, scaling=2.0)
    with torch.no_grad():
        layer.A.normal_()
        layer.B.normal_()
        layer.m.uniform_(0.5, 2.0)
    x = torch.randn(3, 7, dtype=torch.float64)
    W = base.weight + 2.0 * layer.B @ layer.A
    n = W.norm(dim=1, keepdim=True).detach()
    want = x @ (layer.m[:, None] * W / n).T + base.bias
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(got.square().sum(), [layer.A, layer.B, layer.m])
    gw = torch.autograd.grad(want.square().sum(), [layer.A, layer.B, layer.m])
    for a, b in zip(ga, gw):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.delta_weight(), (layer.m[:, None] * W / n - base.weight).detach())


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa", "lora_ga"])
def test_output_unchanged_at_init_merge_and_save_load(init, tmp_path):
    factory, targets, trainable, _ = MODELS["gpt2"]
    data = batches("gpt2", 2, seed=1)
    b = batches("gpt2", 1, seed=5)[0]
    base = factory()
    with torch.no_grad():
        y0 = base(**b).logits
    model, _ = trained_dora("gpt2", "rslora", init) if init != "kaiming" else (None, None)
    cfg = lowrank.LoRAConfig(rank=2, alpha=4, scaling="rslora", targets=targets, init=init, adapter="dora",
                             init_options={"progress": False} if init == "lora_ga" else
                             ({"b_std": 0.05} if init == "gaussian" else {}))
    fresh = lowrank.inject(factory(), cfg, data=data if init == "lora_ga" else None, progress=False)
    with torch.no_grad():
        assert rel(fresh(**b).logits, y0) <= 1e-5  # m = ||W + s B A|| at init: the output is unchanged
    model = model or fresh
    lowrank.save_adapter(model, tmp_path)
    reloaded = lowrank.load_adapter(factory(), tmp_path)
    with torch.no_grad():
        y = model(**b).logits
        assert torch.equal(reloaded(**b).logits, y)  # bit for bit, offset and magnitude included
        lowrank.merge(model)
        assert rel(model(**b).logits, y) <= 1e-5
        lowrank.unmerge(model)
        assert rel(model(**b).logits, y) <= 1e-5
    assert sum(n.endswith(".m") for n, _ in reloaded.named_parameters()) == len(list(lowrank.adapted_layers(model)))
