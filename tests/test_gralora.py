"""GraLoRA (arXiv 2505.20355): the block formula against a float64 reference written here, PEFT 0.21's GraLoRA
layer on the same weights (outputs, delta weights, gradients), export -> PeftModel.from_pretrained, PEFT ->
lowrank.peft.load, merge / unmerge, save / load, and bad options (named layer, value, fix)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lowrank
from lowrank.adapters.gralora import GraLoRALayer
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


def reference_delta(A: torch.Tensor, B: torch.Tensor, k: int, h: int, s: float) -> torch.Tensor:
    """The paper's block update in float64, block by block: ``dW[i, j] = B_ij A_ij`` with ``A_ij`` the ``i``-th
    group of ``r_g / k`` rows and ``j``-th block of ``d_in / k`` columns of ``A``, ``B_ij`` the ``i``-th block of
    rows and ``j``-th group of columns of ``B``; plus the hybrid ``B_h A_h``; times ``s``."""
    A, B = A.double(), B.double()
    m, n, r_g = B.shape[0], A.shape[1], A.shape[0] - h
    g, bo, bi = r_g // k, m // k, n // k
    dw = torch.zeros(m, n, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            A_ij = A[i * g:(i + 1) * g, j * bi:(j + 1) * bi]
            B_ij = B[i * bo:(i + 1) * bo, j * g:(j + 1) * g]
            dw[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = B_ij @ A_ij
    return s * (dw + B[:, r_g:] @ A[r_g:])


def random_layer(d_out, d_in, rank, k, h, conv1d=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = random_base(d_out, d_in, g, conv1d)
    layer = GraLoRALayer(base, rank, alpha=2.0 * rank, scaling=2.0, options=GraLoRALayer.Options(k=k, hybrid_r=h))
    with torch.no_grad():
        layer.A.copy_(torch.randn(layer.A.shape, generator=g))
        layer.B.copy_(torch.randn(layer.B.shape, generator=g))
    return layer, torch.randn(3, 5, d_in, generator=g)


@pytest.mark.parametrize("d_out,d_in,rank,k,h,conv1d", [(12, 8, 4, 2, 0, False), (12, 18, 8, 3, 2, False),
                                                        (8, 8, 6, 2, 2, True), (6, 9, 3, 1, 0, False),
                                                        (16, 8, 8, 4, 0, True)])
def test_forward_and_delta_match_the_float64_block_formula(d_out, d_in, rank, k, h, conv1d):
    layer, x = random_layer(d_out, d_in, rank, k, h, conv1d)
    dw = reference_delta(layer.A, layer.B, k, h, layer.scaling)
    w = layer.base_weight().double()
    want = x.double() @ (w + dw).T + layer.base_layer.bias.double()
    assert rel(layer(x).double(), want) <= 1e-5
    assert rel(layer.delta_weight(torch.float64), dw) <= 1e-12
    assert layer(x[0, 0]).shape == (d_out,)  # any leading dims, a bare vector too
    if k > 1:  # a plain LoRA on the same factors is another update: the block structure is what is tested
        lora = layer.scaling * (layer.B.double() @ layer.A.double())
        assert rel(lora, dw) > 0.1


def _peft_model(kind, r=4, h=2, k=2, alpha=8, seed=0):
    factory, targets, trainable, _ = MODELS[kind]
    torch.manual_seed(seed)
    cfg = peft.GraloraConfig(r=r, hybrid_r=h, gralora_k=k, alpha=alpha, target_modules=targets, init_weights=False,
                             fan_in_fan_out=kind == "gpt2", modules_to_save=trainable or None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(factory(), cfg).eval()


def _copy_from_peft(layer: GraLoRALayer, peft_layer) -> None:
    """PEFT's tensors into lowrank's layout, written from PEFT's forward: ``gralora_A[j, p, c]`` is ``A[c, j n/k + p]``,
    ``gralora_B[i, c, o]`` is ``B[i m/k + o, c]``."""
    gA, gB = peft_layer.gralora_A["default"].detach(), peft_layer.gralora_B["default"].detach()
    k, n_k, r_g = gA.shape
    A = torch.zeros(layer.rank, layer.d_in)
    B = torch.zeros(layer.d_out, layer.rank)
    for j in range(k):
        A[:r_g, j * n_k:(j + 1) * n_k] = gA[j].T
    for i in range(k):
        B[i * gB.shape[2]:(i + 1) * gB.shape[2], :r_g] = gB[i].T
    if layer.hybrid_r:
        A[r_g:] = peft_layer.gralora_A_general["default"].weight.detach()
        B[:, r_g:] = peft_layer.gralora_B_general["default"].weight.detach()
    layer.load_tensors({"A": A, "B": B})


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("h", [0, 2])
def test_equals_peft_gralora_layer_on_the_same_weights(kind, h):
    pm = _peft_model(kind, h=h)
    factory, targets, _, batch = MODELS[kind]
    cfg = lowrank.LoRAConfig(rank=4 + h, alpha=8, targets=targets, adapter="gralora", init="gralora",
                             adapter_options={"k": 2, "hybrid_r": h})
    model = lowrank.inject(factory(), cfg, progress=False)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "gralora_A")}
    layers = dict(lowrank.adapted_layers(model))
    assert set(layers) == set(peft_layers)
    for name, layer in layers.items():
        _copy_from_peft(layer, peft_layers[name])
        delta = peft_layers[name].get_delta_weight("default")
        delta = delta.T if kind == "gpt2" else delta  # PEFT's fan_in_fan_out layout
        assert rel(layer.delta_weight(), delta) <= 1e-5, name
    assert rel(logits(model, kind), logits(pm, kind)) <= 1e-5
    # the same gradients, mapped the same way
    b = batches(kind, 1, seed=6)[0]
    for m in (model, pm):
        m.train()
        m(**b).loss.backward()
    for name, layer in layers.items():
        p = peft_layers[name]
        grad_A = torch.zeros_like(layer.A)
        k, n_k, r_g = p.gralora_A["default"].shape
        for j in range(k):
            grad_A[:r_g, j * n_k:(j + 1) * n_k] = p.gralora_A["default"].grad[j].T
        assert rel(layer.A.grad[:r_g], grad_A[:r_g]) <= 1e-5, name


def _trained(kind, scaling="standard", h=2, seed=1):
    factory, targets, trainable, _ = MODELS[kind]
    cfg = lowrank.LoRAConfig(rank=4 + h, alpha=8, scaling=scaling, targets=targets, trainable=trainable,
                             adapter="gralora", init="gralora", adapter_options={"k": 2, "hybrid_r": h}, seed=seed)
    model = lowrank.inject(factory(), cfg, progress=False)
    opt = torch.optim.SGD(lowrank.trainable_parameters(model).values(), lr=0.1)
    model.train()
    for b in batches(kind, 2, seed=2):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    assert all(layer.B.abs().sum() > 0 for _, layer in lowrank.adapted_layers(model))
    return model.eval(), factory


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_export_loads_in_peft_and_back(kind, scaling, tmp_path):
    model, factory = _trained(kind, scaling)
    lowrank.peft.export(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["hybrid_r"], cfg["gralora_k"]) == ("GRALORA", 4, 2, 2)
    assert cfg["alpha"] / (cfg["r"] + cfg["hybrid_r"]) == pytest.approx(next(lowrank.adapted_layers(model))[1].scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    want = logits(model, kind)
    assert rel(logits(pm, kind), want) <= 1e-5
    assert rel(want, logits(factory(), kind)) > 1e-3  # the adapter acts
    back = lowrank.peft.load(factory(), tmp_path)
    assert rel(logits(back, kind), want) <= 1e-5
    assert {n: l.options for n, l in lowrank.adapted_layers(back)} == {n: l.options for n, l in lowrank.adapted_layers(model)}


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_peft_gralora_adapter_loads_into_lowrank(kind, tmp_path):
    pm = _peft_model(kind, r=4, h=0, k=4, alpha=6)
    head = [p for n, p in pm.named_parameters() if "modules_to_save" in n]
    assert bool(head) == (kind == "bert")
    with torch.no_grad():
        for p in head:  # modules_to_save (BERT's classifier) trained: the file's copy must be loaded
            p.add_(0.5)
    pm.save_pretrained(tmp_path)
    factory = MODELS[kind][0]
    model = lowrank.peft.load(factory(), tmp_path)
    layers = dict(lowrank.adapted_layers(model))
    assert all(layer.k == 4 and layer.rank == 4 and layer.scaling == 6 / 4 for layer in layers.values())
    assert rel(logits(model, kind), logits(pm, kind)) <= 1e-5
    lowrank.peft.export(model, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(factory(), tmp_path / "again").eval()
    assert rel(logits(back, kind), logits(pm, kind)) <= 1e-5


def test_merge_unmerge_unload_and_save_load(tmp_path):
    model, factory = _trained("llama")
    y = logits(model, "llama")
    lowrank.save_adapter(model, tmp_path)
    fresh = lowrank.load_adapter(factory(), tmp_path)
    assert torch.equal(logits(fresh, "llama"), y)
    w = {n: layer.base_weight().clone() for n, layer in lowrank.adapted_layers(model)}
    lowrank.merge(model)
    assert rel(logits(model, "llama"), y) <= 1e-5
    for name, layer in lowrank.adapted_layers(model):
        torch.testing.assert_close(layer.base_weight(), w[name] + layer.delta_weight(), rtol=0, atol=1e-6)
    lowrank.unmerge(model)
    assert all(torch.allclose(layer.base_weight(), w[n], atol=1e-6) for n, layer in lowrank.adapted_layers(model))
    assert rel(logits(model, "llama"), y) <= 1e-5
    assert rel(logits(lowrank.unload(fresh, merge=True), "llama"), y) <= 1e-5


def test_init_preserves_output_and_draws_kaiming_a():
    factory, targets, _, _ = MODELS["gpt2"]
    y0 = logits(factory(), "gpt2")
    cfg = lowrank.LoRAConfig(rank=4, targets=targets, adapter="gralora", init="gralora", seed=3)
    model = lowrank.inject(factory(), cfg, progress=False)
    assert torch.allclose(logits(model, "gpt2"), y0, rtol=1e-5, atol=1e-6)
    for _, layer in lowrank.adapted_layers(model):
        bound = layer.d_in ** -0.5
        assert torch.all(layer.B == 0) and 0.5 * bound < layer.A.abs().max() <= bound


@pytest.mark.parametrize("options,rank,match", [
    ({"k": 3}, 6, r"k=3 does not divide d_in=32; use a k that divides d_out=\d+, d_in=32 and rank - hybrid_r = 6 "
                  r"\(here k in \[1, 2\]\)"),
    ({"k": 2}, 5, r"rank 5 - hybrid_r 0 = 5 is not a positive multiple of k=2; use a rank with rank - hybrid_r divisible "
                  r"by k \(e.g. rank in \[2, 4, 6, 8\]\)"),
    ({"k": 2, "hybrid_r": 4}, 4, r"rank 4 - hybrid_r 4 = 0 is not a positive multiple of k=2"),
])
def test_options_that_do_not_fit_a_layer_are_refused_and_the_model_is_unchanged(options, rank, match):
    factory, targets, _, _ = MODELS["gpt2"]
    model = factory()
    snap = Snapshot(model)
    cfg = lowrank.LoRAConfig(rank=rank, targets=targets, adapter="gralora", init="gralora", adapter_options=options)
    with pytest.raises(ValueError, match=match):
        lowrank.inject(model, cfg, progress=False)
    snap.assert_unchanged()
    module = model.transformer.h[0].attn.c_attn
    with pytest.raises(ValueError, match=r"layer 'transformer.h.0.attn.c_attn' \(gralora\): " + match.split(";")[0]):
        GraLoRALayer.check_layer("transformer.h.0.attn.c_attn", module, rank, GraLoRALayer.Options(**options))


def test_bad_option_values_and_inits_are_config_errors():
    with pytest.raises(ValueError, match=r"invalid k=0: must be a positive integer"):
        lowrank.LoRAConfig(rank=4, targets=["q"], adapter="gralora", init="gralora", adapter_options={"k": 0})
    with pytest.raises(ValueError, match=r"invalid hybrid_r=-1"):
        lowrank.LoRAConfig(rank=4, targets=["q"], adapter="gralora", init="gralora", adapter_options={"hybrid_r": -1})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gralora_k'\] for adapter 'gralora'"):
        lowrank.LoRAConfig(rank=4, targets=["q"], adapter="gralora", init="gralora", adapter_options={"gralora_k": 2})
    with pytest.raises(ValueError, match="initializer 'kaiming' does not support adapter 'gralora'"):
        lowrank.LoRAConfig(rank=4, targets=["q"], adapter="gralora", init="kaiming")
    with pytest.raises(ValueError, match="initializer 'gralora' does not support adapter 'lora'"):
        lowrank.LoRAConfig(rank=4, targets=["q"], init="gralora")


def test_export_refuses_per_layer_ranks_and_merged_layers(tmp_path):
    factory, targets, _, _ = MODELS["gpt2"]
    cfg = lowrank.LoRAConfig(rank=4, targets=targets, adapter="gralora", init="gralora", rank_pattern={"c_fc": 2})
    model = lowrank.inject(factory(), cfg, progress=False)
    with pytest.raises(ValueError, match=r"PEFT's GraLoRA has one r, hybrid_r and alpha for every layer"):
        lowrank.peft.export(model, tmp_path / "a")
    lowrank.merge(model)
    with pytest.raises(ValueError, match="merged"):
        lowrank.peft.export(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_partial_or_mismatched_peft_file_is_refused_and_the_model_is_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = _peft_model("gpt2", r=4, h=2)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    full = load_file(path)
    dropped = next(k for k in full if k.endswith("gralora_A_general.weight"))
    save_file({k: v for k, v in full.items() if k != dropped}, path)
    model = MODELS["gpt2"][0]()
    snap = Snapshot(model)
    with pytest.raises(AdapterFileError, match=r"lacks gralora_A_general.weight; the file is partial"):
        lowrank.peft.load(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    save_file(full, path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "gralora_k": 4}))
    with pytest.raises(AdapterFileError, match=r"layer 'transformer.h.0.attn.c_attn': gralora_A has shape \(2, 16, 4\), the model's "
                                             r"layer needs \(4, 8, 4\)"):
        lowrank.peft.load(model, tmp_path)
    snap.assert_unchanged()


def test_b_std_draws_a_random_b_and_the_output_moves():
    factory, targets, _, _ = MODELS["llama"]
    y0 = logits(factory(), "llama")
    cfg = lowrank.LoRAConfig(rank=4, targets=targets, adapter="gralora", init="gralora", init_options={"b_std": 0.5})
    assert not cfg.make_initializer().preserves_output
    model = lowrank.inject(factory(), cfg, progress=False)
    B = torch.cat([layer.B.flatten() for _, layer in lowrank.adapted_layers(model)])
    assert 0.4 < B.std().item() < 0.6 and rel(logits(model, "llama"), y0) > 1e-3
    with pytest.raises(ValueError, match=r"invalid b_std=-1.0: must be >= 0"):
        cfg.replace(init_options={"b_std": -1.0})
