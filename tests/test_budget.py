"""Rank budgets: the allocation rules (exact sums, bounds, against brute force), the framework feature
(``LoRAConfig(rank_budget=...)``) through inject, summary, save/load and PEFT export, and bad budgets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowrank
from lowrank import LoRAConfig
from lowrank.init.budget import RankBudget, allocate_greedy, allocate_proportional

from .conftest import MODELS, Snapshot, batches, tiny_bert


@st.composite
def budgets(draw, max_layers=5):
    L = draw(st.integers(1, max_layers))
    lo = [draw(st.integers(1, 3)) for _ in range(L)]
    hi = [lo[i] + draw(st.integers(0, 5)) for i in range(L)]
    total = draw(st.integers(sum(lo), sum(hi)))
    names = [f"l{i}" for i in range(L)]
    return RankBudget(total, dict(zip(names, lo)), dict(zip(names, hi)))


@given(budgets(), st.data())
def test_proportional_allocation_is_exact_bounded_and_closest_to_the_shares(budget, data):
    w = {n: data.draw(st.floats(0, 10, allow_nan=False)) for n in budget.lo}
    ranks = budget.check(allocate_proportional(w, budget), "test")  # exact sum, within bounds
    # Water-filling: a layer strictly inside its bounds gets its share lam * w rounded within one unit, and
    # a layer with more weight never gets fewer ranks unless its bounds force it.
    inner = [n for n in ranks if budget.lo[n] < ranks[n] < budget.hi[n]]
    for a, b in itertools.permutations(inner, 2):
        if w[a] > w[b] and budget.lo[a] == budget.lo[b]:
            assert ranks[a] >= ranks[b] - 1, (w, ranks)


def test_proportional_allocation_reference():
    budget = RankBudget(12, {"a": 1, "b": 1, "c": 1}, {"a": 32, "b": 32, "c": 3})
    # shares 12 * (0.5, 0.3, 0.2) = (6, 3.6, 2.4): no layer clipped; floors (6, 3, 2) + the largest remainder
    assert allocate_proportional({"a": 5, "b": 3, "c": 2}, budget) == {"a": 6, "b": 4, "c": 2}
    # c's share 12 * 0.8 = 9.6 is clipped to 3; the other 9 are shared 1:1 -> 4.5 each, ties to the first
    assert allocate_proportional({"a": 1, "b": 1, "c": 8}, budget) == {"a": 5, "b": 4, "c": 3}


@given(budgets(max_layers=4), st.data())
def test_greedy_allocation_equals_brute_force(budget, data):
    scores = {n: torch.tensor(sorted(data.draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=budget.hi[n],
                                                        max_size=budget.hi[n], unique=True)), reverse=True))
              for n in budget.lo}
    ranks = budget.check(allocate_greedy(scores, budget), "test")
    # Brute force: the feasible allocation with the largest total score of the components it keeps.
    best = max((dict(zip(budget.lo, r)) for r in itertools.product(*[range(budget.lo[n], budget.hi[n] + 1)
                                                                      for n in budget.lo])
                if sum(r) == budget.total),
               key=lambda r: sum(scores[n][:r[n]].double().sum().item() for n in r))
    # sums in float64 (as the allocator compares): float32 sums of two allocations can differ by an ulp
    assert math.isclose(sum(scores[n][:ranks[n]].double().sum().item() for n in ranks),
                        sum(scores[n][:best[n]].double().sum().item() for n in best), rel_tol=1e-12)


def test_greedy_allocation_gives_the_budget_to_the_best_components():
    budget = RankBudget(4, {"a": 1, "b": 1}, {"a": 3, "b": 3})
    scores = {"a": torch.tensor([0.5, 0.3, 0.01]), "b": torch.tensor([0.4, 0.2, 0.1])}
    assert allocate_greedy(scores, budget) == {"a": 2, "b": 2}  # 0.3 and 0.2 beat 0.1 and 0.01


def test_bad_budgets_are_clear_errors():
    with pytest.raises(ValueError, match=r"rank_budget=2 is smaller than 3 target layers x their minimum rank"):
        RankBudget(2, {"a": 1, "b": 1, "c": 1}, {"a": 4, "b": 4, "c": 4})
    with pytest.raises(ValueError, match=r"rank_budget=13 is larger than the target layers can hold \(12"):
        RankBudget(13, {"a": 1, "b": 1, "c": 1}, {"a": 4, "b": 4, "c": 4})
    budget = RankBudget(6, {"a": 1, "b": 1}, {"a": 4, "b": 4})
    with pytest.raises(ValueError, match="summing to 5, not the budget 6"):
        budget.check({"a": 4, "b": 1}, "x")
    with pytest.raises(ValueError, match=r"rank 5 to layer 'a', outside its bounds \[1, 4\]"):
        budget.check({"a": 5, "b": 1}, "x")


def _inject_fails(match, **cfg):
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=match):
        lowrank.inject(model, LoRAConfig(**{"targets": ["query", "value"], "rank": 2, "init": "eva",
                                            "init_options": {"progress": False}, **cfg}),
                       data=batches("bert", 2), progress=False)
    snap.assert_unchanged()


def test_bad_budgets_through_inject_leave_the_model_unchanged():
    _inject_fails(r"rank_budget=3 is smaller than 4 target layers", rank_budget=3)
    _inject_fails(r"rank_budget=1000 is larger than the target layers can hold \(16, ", rank_budget=1000)  # 4 x 2r
    _inject_fails(r"rank_budget=40 is larger", rank_budget=40, init_options={"rho": 100, "progress": False},
                  rank_max=5)
    with pytest.raises(ValueError, match=r"initializer 'pissa' cannot allocate ranks under rank_budget=8; use one "
                                         r"that can \(\['eva', 'gora', 'heterolora'\]\)"):
        LoRAConfig(targets=["query"], init="pissa", rank_budget=8)
    with pytest.raises(ValueError, match="invalid rank_max=1 < rank_min=2"):
        LoRAConfig(targets=["query"], init="eva", rank_min=2, rank_max=1)
    with pytest.raises(ValueError, match="invalid rank_budget=0"):
        LoRAConfig(targets=["query"], init="eva", rank_budget=0)


@pytest.mark.parametrize("init,scaling", [("eva", "standard"), ("gora", "rslora")])
def test_allocated_ranks_sum_to_the_budget_and_round_trip(init, scaling, tmp_path):
    factory, targets, trainable, _ = MODELS["llama"]
    data = batches("llama", 3)
    cfg = LoRAConfig(targets=targets, trainable=trainable, rank=4, alpha=8, scaling=scaling, init=init,
                     init_options={"progress": False}, rank_budget=15, rank_min=2)
    model = lowrank.inject(factory(), cfg, data=data, progress=False)
    ranks = lowrank.rank_allocation(model)
    assert sum(ranks.values()) == 15 and min(ranks.values()) >= 2 and len(set(ranks.values())) > 1, ranks
    assert "ranks allocated by" in lowrank.summary(model) and "sum 15 over 6 layers" in lowrank.summary(model)
    for name, layer in lowrank.adapted_layers(model):
        assert layer.scaling == pytest.approx(cfg.scaling_for(name, layer.rank))
    b = batches("llama", 1, seed=5)[0]
    ids = {"input_ids": b["input_ids"]}
    with torch.no_grad():
        y = model(**ids).logits
    # save -> load into the original model: the same ranks and outputs
    lowrank.save_adapter(model, tmp_path / "a")
    back = lowrank.load_adapter(factory(), tmp_path / "a")
    assert lowrank.rank_allocation(back) == ranks
    with torch.no_grad():
        torch.testing.assert_close(back(**ids).logits, y, rtol=0, atol=1e-6)
    # export to PEFT (rank_pattern, alpha_pattern): the same outputs on the original base
    peft = pytest.importorskip("peft")
    lowrank.peft.export(model, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(factory(), tmp_path / "p").eval()
    with torch.no_grad():
        diff = (pm(**ids).logits - y).abs().max() / y.abs().max()
    assert diff <= 1e-5, diff


def test_an_edited_allocation_is_refused_on_load(tmp_path):
    import json

    factory, targets, _, _ = MODELS["llama"]
    cfg = LoRAConfig(targets=targets, rank=2, init="eva", init_options={"progress": False})
    model = lowrank.inject(factory(), cfg, data=batches("llama", 3), progress=False)
    lowrank.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "lowrank_config.json").read_text())
    meta["config"]["rank_budget"] = 7
    (tmp_path / "lowrank_config.json").write_text(json.dumps(meta))
    with pytest.raises(lowrank.AdapterFileError, match="do not fit the config's budget 7"):
        lowrank.load_adapter(factory(), tmp_path)


def test_non_finite_scores_are_refused():
    budget = RankBudget(3, {"a": 1, "b": 1}, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="scores of layer 'a' are not finite"):
        allocate_greedy({"a": torch.tensor([float("nan"), 0.1]), "b": torch.tensor([0.5, 0.2])}, budget)


def test_rank_allocation_is_a_protocol_of_its_own():
    """A user's allocating initializer derives from ``RankAllocation`` (one hook to write) and gets its ranks under
    a budget; the old flag alone is refused with the fix; a plain initializer has no allocation hooks."""

    @lowrank.register_initializer("test_first_gets_more")
    class FirstGetsMore(lowrank.Initializer, lowrank.init.RankAllocation):
        """Kaiming-like; the first layer gets every rank above the minimum."""

        def allocate(self, contexts, budget):
            names = [c.name for c in contexts]
            ranks = {n: budget.lo[n] for n in names}
            ranks[names[0]] += budget.total - sum(ranks.values())
            return ranks

        def init_layer(self, ctx):
            return lowrank.InitResult(A=ctx.randn(ctx.rank, ctx.n), B=ctx.zeros(ctx.m, ctx.rank))

    try:
        assert lowrank.list_initializers(allocates_ranks=True) == sorted(["eva", "gora", "heterolora", "test_first_gets_more"])
        model = lowrank.inject(tiny_bert(), LoRAConfig(rank=2, targets=["query"], init="test_first_gets_more",
                                                       rank_budget=6), progress=False)
        ranks = list(lowrank.rank_allocation(model).values())
        assert sum(ranks) == 6 and ranks[0] == 6 - (len(ranks) - 1) and set(ranks[1:]) == {1}
    finally:
        lowrank.registry.INITIALIZERS.unregister("test_first_gets_more")
    with pytest.raises(TypeError, match="supports_budget = True.*derive from lowrank.init.RankAllocation"):
        class OldStyle(lowrank.Initializer):
            supports_budget = True

            def init_layer(self, ctx):
                raise AssertionError
    assert not hasattr(lowrank.get_initializer("pissa"), "allocate")
    with pytest.raises(ValueError, match=r"cannot allocate ranks under rank_budget=6; use one that can \(\['eva', "
                                         r"'gora', 'heterolora'\]\)"):
        LoRAConfig(rank=2, targets=["query"], init="pissa", rank_budget=6)
