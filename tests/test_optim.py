"""PreconditionedOptimizer: contract over every registered preconditioner, param groups, state,
schedulers, clipping, the transformers Trainer, and bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank.optim import PreconditionedOptimizer, build_optimizer, chain
from tests.conftest import Snapshot, batches, tiny_bert

ALL = lowrank.list_preconditioners()
PAIRS = [(name, adapter) for name in ALL for adapter in lowrank.list_adapters()
         if lowrank.get_adapter(adapter).kind in lowrank.get_preconditioner(name).adapter_kinds]


# per adapter kind other than "factors": its initializer, with options that make every trained tensor non-zero
OWN_INIT = {"latent": ("lora_xs", {}), "blockwise": ("gralora", {"b_std": 0.05}),
            "random_basis": ("randlora", {"lambda_std": 0.05}), "kasa": ("kasa", {"b_std": 0.5}),
            "lora2": ("lora2", {"std": 0.3, "e_std": 0.5}), "reslora": ("kaiming", {})}  # ResLoRA: B = 0, A moves from step 2


def adapted_bert(init="kaiming", seed=0, adapter="lora", **options):
    model = tiny_bert()
    if lowrank.get_adapter(adapter).kind != "factors":
        init, options = OWN_INIT[lowrank.get_adapter(adapter).kind]
    lowrank.inject(model, lowrank.LoRAConfig(rank=4, alpha=8, targets=["query", "value", "dense"],
                                             trainable=["classifier"], init=init, seed=seed, adapter=adapter,
                                             init_options=options))
    if adapter == "reslora":  # its only initializer is kaiming (B = 0): a random B so A gets gradients at once
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lowrank.adapted_layers(model):
                layer.B.copy_(0.05 * torch.randn(layer.B.shape, generator=g))
    return model.train()


def make(model, base, name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_pro's note about adaptive bases
        return PreconditionedOptimizer(model, base=base, preconditioner=name, **kw)


def train(model, opt, data, clip=None):
    for b in data:
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name,adapter", PAIRS)
def test_contract_finite_shapes_and_movement(name, adapter, base):
    model = adapted_bert(init="gaussian", adapter=adapter, b_std=0.05)  # A and B random: both get gradients
    before = params(model)
    opt = make(model, base, name, lr=1e-2)
    train(model, opt, batches("bert", 3))
    after = params(model)
    for n, p in after.items():
        assert p.shape == before[n].shape and torch.isfinite(p).all(), n
    declared = {f"{ln}.{k}" for ln, layer in lowrank.adapted_layers(model) for k in layer.adapter_parameters()}
    moved = {n for n in declared if not torch.equal(after[n], before[n])}
    frozen_A = not lowrank.get_preconditioner(name).trains_A
    assert moved == {n for n in declared if not (frozen_A and n.endswith(".A"))}, sorted(declared - moved)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len([n for n in frozen if n.endswith("base_layer.weight")]) == len(list(lowrank.adapted_layers(model)))
    assert all(torch.equal(after[n], before[n]) for n in frozen), "a frozen weight moved"


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name,adapter", PAIRS)
def test_state_dict_resume_is_bitwise(name, adapter, base):
    data = batches("bert", 6, seed=3)
    model = adapted_bert(adapter=adapter)
    opt = make(model, base, name, lr=1e-2, **({"momentum": 0.9} if base == "sgd" else {}))
    train(model, opt, data[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, data[3:])
    want = params(model)

    resumed = adapted_bert(adapter=adapter)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed, base, name, lr=1e-2, **({"momentum": 0.9} if base == "sgd" else {}))
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[3:])
    got = params(resumed)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_identity_adamw_is_bitwise_plain_adamw():
    data = batches("bert", 4, seed=5)
    a, b = adapted_bert(), adapted_bert()
    opt_a = PreconditionedOptimizer(a, base="adamw", preconditioner="identity", lr=3e-3, weight_decay=0.05)
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.05)
    train(a, opt_a, data)
    train(b, opt_b, data)
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_head_passes_through_untouched():
    """The classifier head is stepped by the base optimizer on its raw gradient."""
    data = batches("bert", 2, seed=6)
    a, b = adapted_bert(), adapted_bert()
    opt_a = PreconditionedOptimizer(a, base="sgd", preconditioner="riemannian", lr=0.1)
    head = [p for n, p in b.named_parameters() if n.startswith("classifier")]
    lora = [p for n, p in b.named_parameters() if p.requires_grad and not n.startswith("classifier")]
    opt_b = torch.optim.SGD(head, lr=0.1)
    for bt in data:
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad(set_to_none=True)
            m(**bt).loss.backward()
        opt_a.step()
        opt_b.step()
        with torch.no_grad():  # mirror the adapter update of `a` so both heads see the same features
            for pa, pb in zip([p for n, p in a.named_parameters() if p.requires_grad and not n.startswith("classifier")],
                              lora):
                pb.copy_(pa)
    pa = {n: p for n, p in a.named_parameters() if n.startswith("classifier")}
    pb = {n: p for n, p in b.named_parameters() if n.startswith("classifier")}
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_lora_plus_ratio_in_param_groups_and_under_scheduler():
    model = adapted_bert()
    opt = PreconditionedOptimizer(model, base="adamw", preconditioner="lora_plus", lr=1e-3, ratio=8)
    roles = {g["lowrank_role"]: g for g in opt.param_groups}
    assert roles["A"]["lr"] == pytest.approx(1e-3) and roles["B"]["lr"] == pytest.approx(8e-3)
    assert roles["other"]["lr"] == pytest.approx(1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    train(model, opt, batches("bert", 2))
    sched.step()
    sched.step()
    assert roles["A"]["lr"] == pytest.approx(2.5e-4) and roles["B"]["lr"] == pytest.approx(2e-3)
    assert opt.base.param_groups is opt.param_groups


def test_chain_composes_ratio_and_preconditioning():
    model = adapted_bert()
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner=["lora_plus", "riemannian"], lr=1e-2, ratio=4,
                                  delta=0.0)
    roles = {g["lowrank_role"]: g["lr"] for g in opt.param_groups}
    assert roles["B"] == pytest.approx(4 * roles["A"])
    assert isinstance(opt.preconditioner, lowrank.optim.Chain)
    assert opt.preconditioner.parts[1].options.delta == 0.0
    same = chain(lowrank.get_preconditioner("lora_plus")(ratio=4), lowrank.get_preconditioner("riemannian")(delta=0.0))
    assert repr(same) == repr(opt.preconditioner)


def test_lora_fa_freezes_A():
    model = adapted_bert()
    opt = make(model, "adamw", "lora_fa", lr=1e-2)
    assert all(not layer.A.requires_grad for _, layer in lowrank.adapted_layers(model))
    assert "A" not in {g["lowrank_role"] for g in opt.param_groups}
    opt.restore_requires_grad()  # the model is trainable as before for the next optimizer
    assert all(layer.A.requires_grad for _, layer in lowrank.adapted_layers(model))


def test_gradient_clipping_and_closure():
    model = adapted_bert()
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="riemannian", lr=1e-2)
    data = batches("bert", 2)
    train(model, opt, data, clip=0.01)
    b = data[0]

    def closure():
        opt.zero_grad()
        loss = model(**b).loss
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert torch.isfinite(loss) and opt.steps == 3


def test_non_finite_gradient_names_layer_and_updates_nothing():
    model = adapted_bert()
    opt = PreconditionedOptimizer(model, base="adamw", preconditioner="riemannian", lr=1e-2)
    train(model, opt, batches("bert", 1))
    opt.zero_grad()
    model(**batches("bert", 1, seed=9)[0]).loss.backward()
    name, layer = list(lowrank.adapted_layers(model))[2]
    layer.B.grad[0, 0] = float("nan")
    before = params(model)
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(FloatingPointError, match=rf"grad_B in layer '{name}'.*no parameter was updated"):
        opt.step()
    after = params(model)
    assert all(torch.equal(after[n], before[n]) for n in after)
    assert opt.state_dict()["steps"] == state_before["steps"]


@pytest.mark.parametrize("name", ALL)
def test_vanilla_init_first_steps_finite(name):
    """Kaiming init has B = 0 (B^T B singular): the defined pseudo-inverse behaviour, never NaN."""
    model = adapted_bert(init="kaiming")
    opt = make(model, "sgd", name, lr=1e-2, **({"delta": 0.0} if name in ("riemannian", "lora_pro", "lora_fa") else {}))
    train(model, opt, batches("bert", 3))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_input():
    model = adapted_bert()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="unknown base optimizer 'lion'"):
        PreconditionedOptimizer(model, base="lion")
    with pytest.raises(KeyError, match="riemanian"):
        PreconditionedOptimizer(model, preconditioner="riemanian")
    with pytest.raises(TypeError, match="AdamW rejected options \\['momentum'\\]"):
        PreconditionedOptimizer(model, base="adamw", preconditioner="riemannian", momentum=0.9)
    with pytest.raises(ValueError, match="ratio"):
        PreconditionedOptimizer(model, preconditioner="lora_plus", ratio=-1)
    with pytest.raises(ValueError, match="must start with a base optimizer"):
        build_optimizer(model, "riemannian+adamw")
    snap.assert_unchanged()
    with pytest.raises(ValueError, match="no lowrank adapters"):
        PreconditionedOptimizer(tiny_bert())
    opt = PreconditionedOptimizer(model, preconditioner="riemannian")
    with pytest.raises(ValueError, match="saved with"):
        opt.load_state_dict(PreconditionedOptimizer(model, preconditioner="identity").state_dict())
    with pytest.raises(ValueError, match="not a PreconditionedOptimizer state_dict"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_build_optimizer():
    model = adapted_bert()
    opt = build_optimizer(model, "sgd+lora_plus+riemannian", lr=0.1, ratio=2, momentum=0.9)
    assert isinstance(opt.base, torch.optim.SGD) and opt.base.defaults["momentum"] == 0.9
    assert [type(p).__name__ for p in opt.preconditioner.parts] == ["LoRAPlus", "Riemannian"]
    assert isinstance(build_optimizer(model, "adamw").preconditioner, lowrank.get_preconditioner("identity"))


def test_lora_pro_warns_under_adam():
    with pytest.warns(UserWarning, match="not implemented"):
        PreconditionedOptimizer(adapted_bert(), base="adamw", preconditioner="lora_pro")


def test_transformers_trainer():
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = batches("bert", 2, bsz=4)
    rows = [{k: v[i] for k, v in b.items()} for b in data for i in range(4)]
    ds = Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    model = adapted_bert()
    before = params(model)
    opt = PreconditionedOptimizer(model, base="adamw", preconditioner="riemannian", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=3, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched)).train()
    assert opt.steps == 3
    after = params(model)
    assert any(not torch.equal(after[n], before[n]) for n in after if n.endswith(".B"))


class Sensing(nn.Module):
    def __init__(self, W0: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(W0)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("base,lr", [("adamw", 2e-2), ("sgd", 0.2)])
@pytest.mark.parametrize("name", ALL)
def test_converges_on_low_rank_matrix_sensing(name, base, lr):
    """Fit y = (W0 + Delta) x with a rank-r Delta. Delta lies in the row space of the initial A, so
    every method, LoRA-FA (A frozen) included, can reach zero loss."""
    if name in ("lora_rite", "loft") and base != "sgd":
        pytest.skip(f"{name} is adaptive itself (the method is base='sgd', which this test runs); under Adam its "
                    "direction is normalized a second time: supported, not the paper's method, and slower here")
    g = torch.Generator().manual_seed(0)
    m, n, r = 12, 16, 3
    model = Sensing(torch.randn(m, n, generator=g) / n ** 0.5)
    lowrank.inject(model, lowrank.LoRAConfig(rank=r, alpha=r, targets=["proj"], init="gaussian",
                                             init_options={"b_std": 0.1}, seed=1))
    layer = dict(lowrank.adapted_layers(model))["proj"]
    delta = torch.randn(m, r, generator=g) @ layer.A.detach() * 0.5
    X = torch.randn(256, n, generator=g)
    Y = X @ (layer.base_weight() + layer.delta_weight() + delta).T.detach()
    opt = make(model, base, name, lr=lr)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-2 * losses[0], (name, base, losses[0], losses[-1])


def test_a_refused_step_leaves_the_preconditioner_state_as_it_was():
    """A non-finite gradient is refused before anything is written: the parameters and the preconditioner's own
    state (LoRA-RITE's moments and step count), not only the step counter."""
    model = adapted_bert()
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="lora_rite", lr=1e-2)
    train(model, opt, batches("bert", 2))
    opt.zero_grad()
    model(**batches("bert", 1, seed=9)[0]).loss.backward()
    name, layer = list(lowrank.adapted_layers(model))[-1]
    layer.B.grad[0, 0] = float("nan")
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(FloatingPointError, match=rf"in layer '{name}'.*no parameter was updated"):
        opt.step()
    after = opt.state_dict()
    assert after["layers"].keys() == before["layers"].keys()
    for n, st in before["layers"].items():
        assert st.keys() == after["layers"][n].keys() and st
        assert all(torch.equal(v, after["layers"][n][k]) for k, v in st.items()), n
