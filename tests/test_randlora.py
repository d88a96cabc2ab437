"""RandLoRA (arXiv 2502.00987): the update against a float64 reference written here (PEFT's pairing of the bases,
and that it differs from the paper's), full rank, PEFT 0.21's initialization bit for bit under one seed, PEFT's
RandLoRA layer on the same weights (outputs, delta weights, gradients), export -> PeftModel.from_pretrained,
PEFT -> lowrank.peft.load (with and without saved bases), merge / unmerge, save / load, and refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank.adapters.randlora import RandLoRALayer
from lowrank.io import AdapterFileError

from .conftest import MODELS, Snapshot, batches, random_base

peft = pytest.importorskip("peft")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, kind, seed=4):
    b = batches(kind, 1, seed=seed)[0]
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


def reference_delta(layer: RandLoRALayer, paper_pairing: bool = False) -> torch.Tensor:
    """``s sum_p u_p v_p^T`` in float64, term by term: ``v_p = lambda[i, b] A[i] * gamma[b]`` for ``p = i N + b``,
    paired with column ``p`` of ``basis_B`` flattened over (basis, column), i.e. ``basis_B[:, p // r, p % r]``
    (PEFT); ``paper_pairing``: with ``basis_B[:, b, i]`` (the paper's ``B_b diag(lambda_b) A diag(gamma_b)``)."""
    A, Bb = layer.basis_A.double(), layer.basis_B.double()
    lam, gamma = layer.lam.double(), layer.gamma.double()
    r, N = lam.shape
    dw = torch.zeros(Bb.shape[0], A.shape[1], dtype=torch.float64)
    for p in range(r * N):
        i, b = divmod(p, N)
        u = Bb[:, b, i] if paper_pairing else Bb[:, p // r, p % r]
        dw += torch.outer(u, lam[i, b] * A[i] * gamma[b])
    dw = dw if layer.d_in <= layer.d_out else dw.T
    return layer.scaling * dw


def random_layer(d_out, d_in, rank, conv1d=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = random_base(d_out, d_in, g, conv1d)
    layer = RandLoRALayer(base, rank, alpha=3.0 * rank, scaling=3.0)
    layer.load_tensors({k: torch.randn(t.shape, generator=g) for k, t in layer.tensors().items()})
    return layer, torch.randn(2, 5, d_in, generator=g)


@pytest.mark.parametrize("d_out,d_in,rank,conv1d", [(16, 12, 4, False), (12, 16, 4, True), (10, 10, 3, False),
                                                    (20, 7, 2, False), (9, 24, 5, True)])
def test_forward_and_delta_match_the_float64_reference_and_reach_full_rank(d_out, d_in, rank, conv1d):
    layer, x = random_layer(d_out, d_in, rank, conv1d)
    assert layer.n_bases == -(-min(d_out, d_in) // rank)
    dw = reference_delta(layer)
    want = x.double() @ (layer.base_weight().double() + dw).T + layer.base_layer.bias.double()
    assert rel(layer(x).double(), want) <= 1e-5
    assert rel(layer.delta_weight(torch.float64), dw) <= 1e-12
    assert torch.linalg.matrix_rank(dw).item() == min(d_out, d_in)  # full rank from rank-r bases
    # PEFT's flattening pairs the bases differently from the paper's sum (module docstring): both are tested
    assert rel(reference_delta(layer, paper_pairing=True), dw) > 0.1


def _peft_config(targets, kind, **kw):
    return peft.RandLoraConfig(r=kw.pop("r", 4), randlora_alpha=kw.pop("alpha", 20), target_modules=targets,
                               fan_in_fan_out=kind == "gpt2", **kw)


def _peft_model(kind, seed=0, **kw):
    factory, targets, trainable, _ = MODELS[kind]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(factory(), _peft_config(targets, kind, modules_to_save=trainable or None, **kw)).eval()


def _peft_layers(pm) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "randlora_lambda")}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("bases", [{}, {"sparse": True}, {"very_sparse": True}])
def test_init_is_peft_s_bit_for_bit_under_one_seed(kind, bases):
    factory, targets, _, _ = MODELS[kind]
    pm = _peft_model(kind, projection_prng_key=7, **bases)
    y0 = logits(factory(), kind)
    cfg = lowrank.LoRAConfig(rank=4, alpha=20, targets=targets, adapter="randlora", init="randlora", init_options=bases,
                             seed=7)
    model = lowrank.inject(factory(), cfg, progress=False)
    peft_layers = _peft_layers(pm)
    assert set(peft_layers) == {n for n, _ in lowrank.adapted_layers(model)}
    for name, layer in lowrank.adapted_layers(model):
        p = peft_layers[name]
        small, large = min(layer.d_out, layer.d_in), max(layer.d_out, layer.d_in)
        assert torch.equal(layer.basis_A, p.randlora_A["default"][:, 0, :small]), name
        assert torch.equal(layer.basis_B, p.randlora_B["default"][:large, :layer.n_bases]), name
        assert torch.equal(layer.lam, p.randlora_lambda["default"]) and torch.equal(layer.gamma, p.randlora_gamma["default"])
        assert torch.all(layer.lam == 0) and torch.all(layer.gamma == 1 / max(layer.gamma.shape))
    assert torch.equal(logits(model, kind), y0)  # lambda = 0: the output is unchanged
    other = lowrank.inject(factory(), cfg.replace(seed=8), progress=False)
    assert not torch.equal(next(lowrank.adapted_layers(other))[1].basis_B, next(lowrank.adapted_layers(model))[1].basis_B)


@pytest.mark.parametrize("kind", list(MODELS))
def test_equals_peft_randlora_layer_on_the_same_weights(kind):
    factory, targets, _, _ = MODELS[kind]
    pm = _peft_model(kind, projection_prng_key=3)
    cfg = lowrank.LoRAConfig(rank=4, alpha=20, targets=targets, adapter="randlora", init="randlora", seed=5)
    model = lowrank.inject(factory(), cfg, progress=False)  # another seed: the bases are copied from PEFT below
    g = torch.Generator().manual_seed(0)
    peft_layers = _peft_layers(pm)
    layers = dict(lowrank.adapted_layers(model))
    for name, layer in layers.items():
        p = peft_layers[name]
        small, large = min(layer.d_out, layer.d_in), max(layer.d_out, layer.d_in)
        with torch.no_grad():
            for t in (p.randlora_lambda["default"], p.randlora_gamma["default"]):
                t.copy_(torch.randn(t.shape, generator=g))
        layer.load_tensors({"basis_A": p.randlora_A["default"][:, 0, :small],
                            "basis_B": p.randlora_B["default"][:large, :layer.n_bases],
                            "lam": p.randlora_lambda["default"], "gamma": p.randlora_gamma["default"]})
        delta = p.get_delta_weight("default")
        assert rel(layer.delta_weight(), delta.T if kind == "gpt2" else delta) <= 1e-5, name
    assert rel(logits(model, kind), logits(pm, kind)) <= 1e-5
    b = batches(kind, 1, seed=6)[0]
    for m in (model, pm):
        m.train()
        m(**b).loss.backward()
    for name, layer in layers.items():  # autograd here, PEFT's own backward (UniqueBaseGrad) there
        assert rel(layer.lam.grad, peft_layers[name].randlora_lambda["default"].grad) <= 1e-5, name
        assert rel(layer.gamma.grad, peft_layers[name].randlora_gamma["default"].grad) <= 1e-5, name


def _trained(kind, scaling="standard", seed=1, **cfg_kw):
    factory, targets, trainable, _ = MODELS[kind]
    cfg = lowrank.LoRAConfig(rank=4, alpha=20, scaling=scaling, targets=targets, trainable=trainable,
                             adapter="randlora", init="randlora", seed=seed, **cfg_kw)
    model = lowrank.inject(factory(), cfg, progress=False)
    opt = torch.optim.SGD(lowrank.trainable_parameters(model).values(), lr=0.1)
    model.train()
    for b in batches(kind, 2, seed=2):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    assert all(layer.lam.abs().sum() > 0 for _, layer in lowrank.adapted_layers(model))
    return model.eval(), factory


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_export_loads_in_peft_and_back(kind, scaling, tmp_path):
    model, factory = _trained(kind, scaling)
    lowrank.peft.export(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    layer = next(lowrank.adapted_layers(model))[1]
    assert (cfg["peft_type"], cfg["r"], cfg["save_projection"], cfg["projection_prng_key"]) == ("RANDLORA", 4, True, 1)
    assert cfg["randlora_alpha"] / cfg["r"] == pytest.approx(layer.scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    want = logits(model, kind)
    assert rel(logits(pm, kind), want) <= 1e-5
    assert rel(want, logits(factory(), kind)) > 1e-3  # the adapter acts
    back = lowrank.peft.load(factory(), tmp_path)
    assert rel(logits(back, kind), want) <= 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_randlora_adapter_loads_into_lowrank(kind, save_projection, tmp_path):
    pm = _peft_model(kind, r=3, alpha=9, projection_prng_key=11, save_projection=save_projection)
    g = torch.Generator().manual_seed(2)
    trained = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n for n, _ in trained) == (kind == "bert")  # BERT's classifier too
    with torch.no_grad():
        for _, p in trained:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path)
    factory = MODELS[kind][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()  # what the file holds, as PEFT reads it
    model = lowrank.peft.load(factory(), tmp_path)
    assert all(layer.rank == 3 and layer.scaling == 3 for _, layer in lowrank.adapted_layers(model))
    assert rel(logits(model, kind), logits(pm, kind)) <= 1e-5
    lowrank.peft.export(model, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(factory(), tmp_path / "again").eval()
    assert rel(logits(back, kind), logits(pm, kind)) <= 1e-5


def test_merge_unmerge_unload_and_save_load(tmp_path):
    model, factory = _trained("gpt2")
    y = logits(model, "gpt2")
    lowrank.save_adapter(model, tmp_path)
    fresh = lowrank.load_adapter(factory(), tmp_path)
    assert torch.equal(logits(fresh, "gpt2"), y)
    w = {n: layer.base_weight().clone() for n, layer in lowrank.adapted_layers(model)}
    lowrank.merge(model)
    assert rel(logits(model, "gpt2"), y) <= 1e-5
    for name, layer in lowrank.adapted_layers(model):
        torch.testing.assert_close(layer.base_weight(), w[name] + layer.delta_weight(), rtol=0, atol=1e-6)
    lowrank.unmerge(model)
    assert all(torch.allclose(layer.base_weight(), w[n], atol=1e-6) for n, layer in lowrank.adapted_layers(model))
    assert rel(logits(model, "gpt2"), y) <= 1e-5
    assert rel(logits(lowrank.unload(fresh, merge=True), "gpt2"), y) <= 1e-5


def test_export_refuses_per_layer_ranks_and_bases_not_drawn_together(tmp_path):
    factory, targets, _, _ = MODELS["gpt2"]
    cfg = lowrank.LoRAConfig(rank=4, alpha=20, targets=targets, adapter="randlora", init="randlora",
                             rank_pattern={"c_fc": 2})
    with pytest.raises(ValueError, match=r"PEFT's RandLoRA has one r and randlora_alpha for every layer"):
        lowrank.peft.export(lowrank.inject(factory(), cfg, progress=False), tmp_path / "a")
    model = lowrank.inject(factory(), cfg.replace(rank_pattern={}), progress=False)
    other = lowrank.inject(factory(), cfg.replace(rank_pattern={}, seed=9), progress=False)
    name, layer = next(lowrank.adapted_layers(model))
    layer.load_tensors({**layer.tensors(), "basis_A": dict(lowrank.adapted_layers(other))[name].basis_A})
    with pytest.raises(ValueError, match=r"its random bases are not a slice of the pair the other layers share"):
        lowrank.peft.export(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_config_errors_and_an_initializer_run_without_its_checks():
    with pytest.raises(ValueError, match="initializer 'kaiming' does not support adapter 'randlora'"):
        lowrank.LoRAConfig(rank=4, targets=["q"], adapter="randlora")
    with pytest.raises(ValueError, match="initializer 'randlora' does not support adapter 'lora'"):
        lowrank.LoRAConfig(rank=4, targets=["q"], init="randlora")
    with pytest.raises(ValueError, match="sparse and very_sparse are both set; choose one"):
        lowrank.LoRAConfig(rank=4, targets=["q"], adapter="randlora", init="randlora",
                           init_options={"sparse": True, "very_sparse": True})
    from lowrank.init.base import LayerContext

    ctx = LayerContext("fc", nn.Linear(8, 8), rank=2, alpha=4, scaling=2)
    with pytest.raises(RuntimeError, match=r"layer 'fc': the randlora initializer sizes its shared bases from every"):
        lowrank.get_initializer("randlora")().init_layer(ctx)


def test_a_partial_peft_file_is_refused_and_the_model_is_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = _peft_model("gpt2")
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    full = load_file(path)
    model = MODELS["gpt2"][0]()
    snap = Snapshot(model)
    for drop, match in ((lambda k: k.endswith("c_fc.randlora_gamma"), r"lacks randlora_gamma; the file is partial"),
                        (lambda k: k.endswith(("randlora_A", "randlora_B")), r"lacks randlora_A / randlora_B")):
        save_file({k: v for k, v in full.items() if not drop(k)}, path)
        with pytest.raises(AdapterFileError, match=match):
            lowrank.peft.load(model, tmp_path)
    snap.assert_unchanged()


def test_lambda_std_draws_a_random_lambda_and_the_output_moves():
    factory, targets, _, _ = MODELS["llama"]
    y0 = logits(factory(), "llama")
    cfg = lowrank.LoRAConfig(rank=4, targets=targets, adapter="randlora", init="randlora",
                             init_options={"lambda_std": 0.5})
    assert not cfg.make_initializer().preserves_output
    model = lowrank.inject(factory(), cfg, progress=False)
    lam = torch.cat([layer.lam.flatten() for _, layer in lowrank.adapted_layers(model)])
    assert 0.4 < lam.std().item() < 0.6 and rel(logits(model, "llama"), y0) > 1e-3
    with pytest.raises(ValueError, match=r"invalid lambda_std=-1.0: must be >= 0"):
        cfg.replace(init_options={"lambda_std": -1.0})
