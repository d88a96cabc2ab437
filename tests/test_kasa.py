"""KaSA (arXiv 2412.06071): the truncation, the draws and the forward against float64 references written here, PEFT
0.21's KaSA LoRA on the same weights (truncated bases, outputs, merged weights, the auxiliary loss and its
gradients), the regularizer's effect under gradient steps, save / load, unload back to the original W0, and
refusals that name the layer and the value."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank.adapters.kasa import KaSALayer, kasa_loss
from lowrank.init.base import layer_seed

from .conftest import MODELS, Snapshot, batches, random_base

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import KasaConfig  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def logits(model, kind, seed=4):
    b = batches(kind, 1, seed=seed)[0]
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


class One(nn.Module):
    """One target layer, ``proj``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def one_layer(d_out, d_in, conv1d=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = random_base(d_out, d_in, g, conv1d)
    return One(base), torch.randn(3, 5, d_in, generator=g, dtype=torch.float64)


def kasa_config(rank, targets, alpha=None, seed=0, **adapter_options):
    return lowrank.LoRAConfig(rank=rank, alpha=alpha or 2.0 * rank, targets=targets, init="kasa", adapter="kasa",
                              seed=seed, adapter_options=adapter_options)


def w_mn(module: nn.Module) -> torch.Tensor:
    """A plain module's weight as ``(d_out, d_in)``, float64."""
    w = module.weight.detach().double()
    return w if isinstance(module, nn.Linear) else w.T


def reference_truncation(w0: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top k - r part, minor r part)`` of ``w0`` in float64, from its SVD."""
    U, S, Vh = torch.linalg.svd(w0.double(), full_matrices=False)
    k = S.numel() - r
    return (U[:, :k] * S[:k]) @ Vh[:k], (U[:, k:] * S[k:]) @ Vh[k:]


SHAPES = [(16, 12, 4, False), (12, 16, 3, True), (10, 10, 9, False), (20, 7, 2, True)]


@pytest.mark.parametrize("d_out,d_in,rank,conv1d", SHAPES)
def test_init_truncates_the_minor_triplets_and_draws_from_the_layer_generator(d_out, d_in, rank, conv1d):
    model, _ = one_layer(d_out, d_in, conv1d)
    w0 = w_mn(model.proj)
    top, minor = reference_truncation(w0, rank)
    lowrank.inject(model, kasa_config(rank, ["proj"], seed=3), progress=False)
    layer = model.proj
    assert isinstance(layer, KaSALayer) and layer.offset
    assert rel(layer.base_weight(), top) <= 1e-5  # W = the top k - r part of W0
    assert rel(layer.scaling * layer.B0.double() @ layer.A0.double(), minor) <= 1e-5  # the record: what was dropped
    # the minor part's factors are balanced (MiLoRA's): A0 A0^T = B0^T B0 = diag(S_m) / s
    torch.testing.assert_close(layer.A0 @ layer.A0.T, layer.B0.T @ layer.B0, rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(layer_seed(3, "proj"))
    want_A = (2.0 * torch.rand(rank, d_in, generator=g) - 1.0) / math.sqrt(d_in)  # Kaiming-uniform, a = sqrt(5)
    want_d = torch.randn(rank, generator=g)  # N(0, 1), as PEFT's torch.randn(r)
    torch.testing.assert_close(layer.A.detach(), want_A, rtol=1e-6, atol=1e-7)
    assert torch.equal(layer.diag.detach(), want_d)
    assert torch.equal(layer.B, torch.zeros(d_out, rank))
    assert {k for k, p in layer.adapter_parameters().items() if p.requires_grad} == {"A", "B", "diag"}
    assert layer.factors() is None  # the update is s B diag(d) A: no (A, B) pair for a preconditioner


def test_b_std_draws_b_after_a_and_the_singular_values():
    model, _ = one_layer(14, 10)
    cfg = kasa_config(3, ["proj"], seed=2).replace(init_options={"b_std": 0.3})
    lowrank.inject(model, cfg, progress=False)
    g = torch.Generator().manual_seed(layer_seed(2, "proj"))
    torch.rand(3, 10, generator=g)  # A first
    torch.randn(3, generator=g)  # then d
    assert torch.equal(model.proj.B.detach(), 0.3 * torch.randn(14, 3, generator=g))
    assert model.proj.delta_weight().abs().max() > 0
    with pytest.raises(ValueError, match=r"invalid b_std=-0.1: must be >= 0"):
        cfg.replace(init_options={"b_std": -0.1})


@pytest.mark.parametrize("d_out,d_in,rank,conv1d", SHAPES)
def test_forward_and_delta_match_the_float64_reference(d_out, d_in, rank, conv1d):
    model, x = one_layer(d_out, d_in, conv1d, seed=1)
    w0 = w_mn(model.proj)
    bias = model.proj.bias.detach().double()
    lowrank.inject(model, kasa_config(rank, ["proj"], alpha=3.0), progress=False)
    layer = model.proj
    g = torch.Generator().manual_seed(7)
    trained = {k: torch.randn(t.shape, generator=g) for k, t in layer.tensors().items() if k in ("A", "B", "diag")}
    layer.load_tensors({**layer.tensors(), **trained})
    A, B, d = (trained[k].double() for k in ("A", "B", "diag"))
    s = 3.0 / rank
    dw = s * B @ torch.diag(d) @ A
    want = x @ (reference_truncation(w0, rank)[0] + dw).T + bias
    assert rel(layer(x.float()), want) <= 1e-5
    assert rel(layer.delta_weight(torch.float64), dw) <= 1e-12
    assert rel(layer.delta_weight(torch.float64), s * B @ A) > 0.1  # the diagonal acts


def peft_kasa(kind, rank, alpha, beta, gamma, rslora=False):
    factory, targets, _, _ = MODELS[kind]
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                          kasa_config=KasaConfig(beta=beta, gamma=gamma))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(factory(), cfg)
    return pm, {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_diag")}


def give_peft_weights(layers, peft_layers, seed=0):
    """Random non-zero ``B`` (and the rest) in PEFT's layers, copied into lowrank's."""
    g = torch.Generator().manual_seed(seed)
    for name, layer in layers.items():
        p = peft_layers[name]
        with torch.no_grad():
            p.lora_B["default"].weight.copy_(0.3 * torch.randn(p.lora_B["default"].weight.shape, generator=g))
            p.lora_A["default"].weight.add_(0.1 * torch.randn(p.lora_A["default"].weight.shape, generator=g))
        layer.load_tensors({**layer.tensors(), "A": p.lora_A["default"].weight.detach(),
                            "B": p.lora_B["default"].weight.detach(), "diag": p.lora_diag["default"].detach()})


@pytest.mark.parametrize("kind,scaling", [("llama", "standard"), ("bert", "rslora")])
def test_equals_peft_kasa_on_the_same_weights(kind, scaling):
    rank, alpha, beta, gamma = 3, 5.0, 0.3, 0.7  # coefficients large enough for both terms to count
    pm, peft_layers = peft_kasa(kind, rank, alpha, beta, gamma, rslora=scaling == "rslora")
    factory, targets, _, _ = MODELS[kind]
    cfg = kasa_config(rank, targets, alpha=alpha, beta=beta, gamma=gamma).replace(scaling=scaling)
    model = lowrank.inject(factory(), cfg, progress=False)
    layers = dict(lowrank.adapted_layers(model))
    assert layers and layers.keys() == peft_layers.keys()
    for name, layer in layers.items():  # PEFT's truncated base weight
        assert rel(layer.base_weight(), peft_layers[name].base_layer.weight) <= 1e-5, name
        assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"])
    give_peft_weights(layers, peft_layers)
    assert rel(logits(model, kind), logits(pm, kind)) <= 1e-5
    # the auxiliary loss (PEFT's LoraModel._get_kasa_loss) and the gradients of task + auxiliary loss
    assert abs(kasa_loss(model).item() - pm.base_model._get_kasa_loss().item()) <= 1e-5 * pm.base_model._get_kasa_loss().item()
    batch = batches(kind, 1, seed=9)[0]
    for m in (model.train(), pm.train()):
        (m(**batch).loss + (kasa_loss(m) if m is model else m.base_model._get_kasa_loss())).backward()
    for name, layer in layers.items():
        p = peft_layers[name]
        for mine, theirs in ((layer.A, p.lora_A["default"].weight), (layer.B, p.lora_B["default"].weight),
                             (layer.diag, p.lora_diag["default"])):
            assert rel(mine.grad, theirs.grad) <= 1e-5, name
    # merged weights: the truncated base plus s B diag(d) A
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    lowrank.merge(model)
    mods = dict(merged.named_modules())
    for name, layer in layers.items():
        assert rel(layer.base_weight(), mods[name].weight) <= 1e-5, name


def test_regularizer_matches_its_formula_and_its_steps_restore_orthogonality():
    model, _ = one_layer(24, 16)
    lowrank.inject(model, kasa_config(4, ["proj"]), progress=False)
    layer = model.proj
    g = torch.Generator().manual_seed(2)
    layer.load_tensors({**layer.tensors(), "B": torch.randn(24, 4, generator=g), "A": torch.randn(4, 16, generator=g)})

    def ortho(A, B):
        eye = torch.eye(4, dtype=torch.float64)
        return (torch.linalg.matrix_norm(B.T @ B - eye) + torch.linalg.matrix_norm(A @ A.T - eye)).item()

    A, B, d = (layer.tensors()[k].double() for k in ("A", "B", "diag"))
    want = 0.2 * (d ** 2).sum().item() + 0.5 * ortho(A, B)
    assert kasa_loss(model, beta=0.2, gamma=0.5).item() == pytest.approx(want, rel=1e-6)
    assert layer.regularization().item() == pytest.approx(1e-4 * (d ** 2).sum().item() + 1e-3 * ortho(A, B), rel=1e-6)
    kasa_loss(model, beta=0.2, gamma=0.0).backward()
    assert torch.allclose(layer.diag.grad, 0.4 * layer.diag.detach()) and layer.A.grad.abs().sum() == 0
    layer.zero_grad()
    opt = torch.optim.SGD(layer.adapter_parameters().values(), lr=0.02)
    errors = [ortho(layer.A.detach().double(), layer.B.detach().double())]
    for _ in range(30):
        opt.zero_grad()
        kasa_loss(model, beta=0.0, gamma=1.0).backward()
        assert layer.A.grad.abs().sum() > 0 and layer.B.grad.abs().sum() > 0
        opt.step()
        errors.append(ortho(layer.A.detach().double(), layer.B.detach().double()))
    assert all(b < a for a, b in zip(errors, errors[1:])) and errors[-1] < 0.5 * errors[0]


def train_step(model, kind, seed=2):
    opt = torch.optim.SGD(lowrank.trainable_parameters(model).values(), lr=0.2)
    model.train()
    (model(**batches(kind, 1, seed=seed)[0]).loss + kasa_loss(model)).backward()
    opt.step()


def test_save_load_merge_and_unload_back_to_the_original_weight(tmp_path):
    kind = "gpt2"  # Conv1D layers (PEFT refuses them; here the (d_out, d_in) view is truncated)
    factory, targets, _, _ = MODELS[kind]
    w0 = {n: w_mn(m) for n, m in factory().named_modules() if n.split(".")[-1] in targets}
    y0 = logits(factory(), kind)
    cfg = kasa_config(2, targets, beta=0.01, gamma=0.02)
    model = lowrank.inject(factory(), cfg, progress=False)
    assert rel(logits(model, kind), y0) > 1e-6  # the truncation moves the output at step 0 (preserves_output)
    train_step(model, kind)
    y, reg = logits(model, kind), kasa_loss(model).item()
    lowrank.save_adapter(model, tmp_path)
    fresh = lowrank.load_adapter(factory(), tmp_path)  # onto the original model: the same truncated base
    assert torch.equal(logits(fresh, kind), y) and kasa_loss(fresh).item() == reg  # options (beta, gamma) saved
    for (_, a), (_, b) in zip(lowrank.adapted_layers(fresh), lowrank.adapted_layers(model)):
        assert torch.equal(a.base_weight(), b.base_weight()) and torch.equal(a.diag, b.diag)
    resumed = lowrank.inject(factory(), cfg.replace(seed=5), progress=False)  # an injected model: resume
    assert torch.equal(lowrank.load_adapter(resumed, tmp_path) and logits(resumed, kind), y)
    lowrank.merge(model)
    assert rel(logits(model, kind), y) <= 1e-5
    lowrank.unmerge(model)
    assert rel(logits(model, kind), y) <= 1e-5
    plain = lowrank.unload(fresh, merge=False)  # the dropped components come back: the original W0
    assert not list(lowrank.adapted_layers(plain))
    for n, m in plain.named_modules():
        if n in w0:
            assert rel(w_mn(m), w0[n]) <= 1e-6, n
    assert rel(logits(plain, kind), y0) <= 1e-5
    assert rel(logits(lowrank.unload(model, merge=True), kind), y) <= 1e-5


def test_bad_input_names_the_layer_and_the_value_and_leaves_the_model_unchanged():
    factory, targets, _, _ = MODELS["llama"]
    model = factory()
    snap = Snapshot(model)
    name = "model.layers.0.self_attn.v_proj"  # (d_out, d_in) = (16, 32)
    with pytest.raises(ValueError, match=rf"layer '{name}' \(kasa\): rank 16 >= min\(d_out, d_in\) = min\(16, 32\) "
                                         r"= 16; .* use rank <= 15"):
        lowrank.inject(model, kasa_config(2, targets).replace(rank_pattern={name: 16}), progress=False)
    snap.assert_unchanged()
    with pytest.raises(ValueError, match="has no kasa adapter layers"):
        kasa_loss(model)
    for bad in ({"beta": -1.0}, {"gamma": -0.5}):
        with pytest.raises(ValueError, match=f"invalid {next(iter(bad))}=-"):
            kasa_config(2, targets, **bad)
    with pytest.raises(ValueError, match="initializer 'pissa' does not support adapter 'kasa'"):
        lowrank.LoRAConfig(rank=2, targets=targets, init="pissa", adapter="kasa")
    with pytest.raises(ValueError, match="initializer 'kasa' does not support adapter 'lora'"):
        lowrank.LoRAConfig(rank=2, targets=targets, init="kasa")
    adapted = lowrank.inject(factory(), kasa_config(2, targets), progress=False)
    with pytest.raises(ValueError, match=r"invalid gamma=nan"):
        kasa_loss(adapted, gamma=float("nan"))
    with pytest.raises(ValueError, match="needs its singular values d"):
        layer = KaSALayer(nn.Linear(8, 8), 2, 4.0, 2.0)
        layer.initialize(lowrank.InitResult(A=torch.zeros(2, 8), B=torch.zeros(8, 2)))


def test_the_ablation_runner_adds_kasas_loss_for_kasa_arms_only():
    from lowrank_ablation.run import _regularizer
    from lowrank.adapters.kasa import kasa_loss

    assert _regularizer({"arm_config": {"adapter": "kasa"}}) is kasa_loss
    assert _regularizer({"arm_config": {}}) is None and _regularizer({"arm_config": {"adapter": "dora"}}) is None
