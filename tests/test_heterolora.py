"""HeteroLoRA (arXiv 2406.14956): modules switched on (rank r) or off (rank 0) under a budget by the GRAD-NORM
proxy ``||dL/dA|| + ||dL/dB||`` at init, against autograd in float64 on a LoRA built as the paper scores it; a
module switched off stays a plain base module through save/load, merge, summary and the PEFT export."""

from __future__ import annotations

import pytest
import torch

import lowrank
from tests.conftest import Snapshot, batches, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 6 modules in the tiny Llama


def _config(budget=6, rank=2, rank_min=None, **kw):
    return lowrank.LoRAConfig(rank=rank, alpha=4, targets=TARGETS, init="heterolora", rank_budget=budget,
                              rank_min=rank_min, init_options={"progress": False, **kw.pop("init_options", {})}, seed=3,
                              **kw)


def _reference_scores(data) -> dict[str, float]:
    """The paper's proxy by autograd: every module on, vanilla LoRA init (the same seeded draws), float64."""
    model = lowrank.inject(tiny_llama(torch.float64), lowrank.LoRAConfig(rank=2, alpha=4, targets=TARGETS,
                                                                          init="kaiming", seed=3))
    loss = sum(model(**b).loss for b in data) / len(data)
    loss.backward()
    return {n: float(layer.A.grad.norm() + layer.B.grad.norm()) for n, layer in lowrank.adapted_layers(model)}


def test_the_budget_switches_on_the_modules_with_the_largest_grad_norm():
    data = batches("llama", 3)
    ref = _reference_scores(data)
    model = lowrank.inject(tiny_llama(torch.float64), _config(budget=6), data=data, progress=False)
    on = dict(lowrank.adapted_layers(model))
    want = set(sorted(ref, key=ref.get, reverse=True)[:3])  # budget 6 at r = 2: three modules on
    assert set(on) == want, (sorted(ref.items(), key=lambda kv: -kv[1]), sorted(on))
    assert all(layer.rank == 2 and not layer.B.any() for layer in on.values())
    off = set(ref) - want
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in off)  # no adapter there
    assert lowrank.rank_allocation(model) == {n: 2 for n in want}


def test_a_model_with_modules_off_saves_loads_merges_and_exports(tmp_path):
    data = batches("llama", 3)
    model = lowrank.inject(tiny_llama(), _config(budget=4), data=data, progress=False)
    opt = torch.optim.AdamW(lowrank.trainable_parameters(model).values(), lr=1e-2)
    for b in batches("llama", 3, seed=1):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = model(**batches("llama", 1, seed=9)[0]).logits
    assert len(lowrank.rank_allocation(model)) == 2 and lowrank.summary(model)
    lowrank.save_adapter(model, tmp_path / "a")
    loaded = lowrank.load_adapter(tiny_llama(), tmp_path / "a")
    assert set(lowrank.rank_allocation(loaded)) == set(lowrank.rank_allocation(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches("llama", 1, seed=9)[0]).logits, want)
        lowrank.merge(loaded)
        torch.testing.assert_close(loaded(**batches("llama", 1, seed=9)[0]).logits, want, rtol=1e-5, atol=1e-5)
    peft = pytest.importorskip("peft")
    lowrank.peft.export(model, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batches("llama", 1, seed=9)[0]).logits, want, rtol=1e-5, atol=1e-5)


def test_the_constant_proxy_is_a_seeded_random_choice():
    data = batches("llama", 2)
    pick = lambda seed: set(lowrank.rank_allocation(lowrank.inject(  # noqa: E731
        tiny_llama(), lowrank.LoRAConfig(rank=2, targets=TARGETS, init="heterolora", rank_budget=6, rank_min=0,
                                         seed=seed, init_options={"proxy": "constant", "progress": False}),
        data=data, progress=False)))
    assert pick(0) == pick(0) and len(pick(0)) == 3
    assert len({frozenset(pick(s)) for s in range(6)}) > 1


@pytest.mark.parametrize("change,message", [
    ({"rank_min": 1}, r"heterolora switches modules off \(rank 0\), but rank_min is 1: pass LoRAConfig\(rank_min=0\)"),
    ({"init_options": {"turn_on": 1.5}}, r"invalid turn_on=1.5: a fraction in \(0, 1\]"),
    ({"rank_budget": 5}, r"rank_budget=5 is not a multiple of 2; use 4 or 6"),
    ({"rank_budget": 0}, r"invalid rank_budget=0"),
])
def test_a_budget_heterolora_cannot_meet_is_refused_before_the_data_pass(change, message):
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=message):
        lowrank.inject(model, _config(**change) if "rank_budget" not in change else
                       lowrank.LoRAConfig(rank=2, targets=TARGETS, init="heterolora", **change),
                       data=None, progress=False)
    snap.assert_unchanged()


def test_without_a_budget_a_quarter_of_the_modules_is_switched_on():
    model = lowrank.inject(tiny_llama(), lowrank.LoRAConfig(rank=2, targets=TARGETS, init="heterolora",
                                                            init_options={"progress": False}),
                           data=batches("llama", 2), progress=False)
    assert lowrank.rank_allocation(model) and len(lowrank.rank_allocation(model)) == 2  # round(0.25 * 6) = 2
