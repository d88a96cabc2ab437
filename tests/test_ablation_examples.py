"""Per-example outcomes: their compact form in a record, the contract check, and the crossed seeds x examples
interval — its two limits (no example effect: the paired t over seeds; no seed effect: the paired t over
examples), its coverage on simulated exact-match data with a known difference, and the summary using it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowrank_ablation import outcomes
from lowrank_ablation.verdicts import CROSSED, crossed, mdd, mean_ci, paired
from lowrank_ablation.summary import markdown, rows
from tests.test_ablation_power import _config
from tests.test_ablation_search import drive


@pytest.mark.parametrize("values", [[], [1], [0, 1, 1], [1, 0, 0, 1, 1, 0, 1], [0] * 9 + [1], [0.5, 1.0, 0.0]])
def test_encode_decode_round_trip(values):
    stored = outcomes.encode(values)
    assert stored["n"] == len(values) and outcomes.decode(stored) == [float(v) for v in values]
    if values and all(v in (0, 1) for v in values):
        assert len(stored["bits"]) == math.ceil(len(values) / 4)  # 500 examples: 125 characters


def test_split_checks_that_outcomes_average_to_their_metric():
    metrics, per = outcomes.split({"loss": 1.0, "exact_match": 0.5, "outcomes": {"exact_match": [1, 0]}}, "t")
    assert metrics == {"loss": 1.0, "exact_match": 0.5} and per == {"exact_match": [1, 0]}
    assert outcomes.split({"loss": 1.0}, "t") == ({"loss": 1.0}, {})
    with pytest.raises(ValueError, match="is not the metric"):
        outcomes.split({"loss": 1.0, "exact_match": 0.4, "outcomes": {"exact_match": [1, 0]}}, "task 'x'")
    with pytest.raises(ValueError, match="not one of its metrics"):
        outcomes.split({"loss": 1.0, "outcomes": {"accuracy": [1, 0]}}, "task 'x'")


def test_crossed_reduces_to_the_paired_t_over_seeds_without_example_effects():
    rng = np.random.default_rng(0)
    shift = {s: float(rng.normal(0.05, 0.02)) for s in range(4)}
    arm = {s: [0.5 + shift[s]] * 30 for s in shift}  # every example of a seed moves together
    ref = {s: [0.5] * 30 for s in shift}
    iv, seeds = crossed(arm, ref), paired({s: 0.5 + v for s, v in shift.items()}, {s: 0.5 for s in shift})
    assert (iv.lo, iv.mean, iv.hi) == pytest.approx((seeds.lo, seeds.mean, seeds.hi), rel=1e-9)
    assert iv.df == pytest.approx(3) and iv.basis == CROSSED and iv.n == 4


def test_crossed_reduces_to_the_paired_t_over_examples_without_seed_effects():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 0.3, size=40)
    arm = {s: list(0.5 + d) for s in range(3)}  # every seed gives the same outcomes
    ref = {s: [0.5] * 40 for s in range(3)}
    iv, examples = crossed(arm, ref), mean_ci(list(d))
    assert (iv.lo, iv.mean, iv.hi) == pytest.approx((examples.lo, examples.mean, examples.hi), rel=1e-9)
    assert iv.df == pytest.approx(39) and mdd(iv) == pytest.approx(mdd(examples), rel=1e-6)


def test_crossed_refuses_unpaired_examples_and_needs_two_seeds():
    with pytest.raises(ValueError, match="not tested on the same examples"):
        crossed({0: [1, 0], 1: [1, 0]}, {0: [1, 0, 1], 1: [1, 0]})
    one = crossed({0: [1, 0, 1]}, {0: [0, 0, 1]})
    assert one.ci is None and one.mean == pytest.approx(1 / 3)


def _simulate(rng, seeds, n, persist, delta=0.1, seed_shift=0.03):
    """Exact-match outcomes of two arms on ``n`` problems drawn from a population in which the arm's accuracy
    is the reference's + ``delta`` exactly. A trained model's answer to a problem tends to repeat across seeds:
    with probability ``persist`` a seed reuses the problem's own draw, else draws afresh (its accuracy moved
    by a seed effect of mean 0)."""
    q = rng.uniform(0.2, 0.6, n)
    out = []
    for p in (q + delta, q):
        fixed = rng.random(n) < p
        runs = {}
        for s in range(seeds):
            fresh = rng.random(n) < p + rng.uniform(-seed_shift, seed_shift)
            runs[s] = list(np.where(rng.random(n) < persist, fixed, fresh).astype(float))
        out.append(runs)
    return out


@pytest.mark.parametrize("seeds,n,persist", [(3, 100, 0.9), (3, 200, 0.0), (5, 60, 0.6)])
def test_crossed_interval_covers_the_true_difference_95_percent_of_the_time(seeds, n, persist):
    rng = np.random.default_rng(seeds * 1000 + n)
    sims, hit, hit_seeds = 800, 0, 0
    for _ in range(sims):
        arm, ref = _simulate(rng, seeds, n, persist)
        iv = crossed(arm, ref)
        hit += iv.lo < 0.1 < iv.hi
        by_seed = paired({s: np.mean(v) for s, v in arm.items()}, {s: np.mean(v) for s, v in ref.items()})
        hit_seeds += by_seed.lo < 0.1 < by_seed.hi
    assert 0.92 <= hit / sims <= 0.98  # 800 simulations: the coverage's sd is 0.008
    if persist >= 0.9:  # why the seed-only interval is not enough: it treats the 100 problems as the population
        assert hit_seeds / sims < 0.8


def test_summary_pairs_per_example_outcomes_when_every_seed_has_them(tmp_path):
    cfg = _config(tmp_path, "equivalence_margin = 0.05")
    plans, done = drive(cfg, lambda arm, lr: abs(math.log(lr / 0.01)),
                        test_of_run=lambda r: 0.5 + 0.01 * (r["seed"] - 1) * (r["arm"] == "GA"))
    rng = np.random.default_rng(3)
    per = {}
    for key, r in done.items():  # hand-made per-example losses around each run's test loss
        values = list(r["test"]["loss"] + rng.normal(0, 0.2, 50))
        per[key] = values
        r["test_outcomes"] = {"loss": outcomes.encode(values, order="same test set")}
    out = {r["arm"]: r for r in rows(cfg, plans, done)}
    finals = {(r["arm"], r["seed"]): per[k] for k, r in done.items()
              if r["lr"] == next(p.chosen for p in plans if p.arm == r["arm"])}
    expected = crossed({s: finals["GA", s] for s in range(3)}, {s: finals["LoRA", s] for s in range(3)})
    ga = out["GA"]
    assert ga["delta_basis"] == CROSSED and ga["delta_ci"] == pytest.approx([expected.lo, expected.hi])
    assert ga["mdd"] == pytest.approx(mdd(expected)) and out["LoRA"]["delta_basis"] is None
    assert "†" in markdown(cfg, plans, done, list(out.values()))
    ga2 = next(k for k, r in done.items() if r["arm"] == "GA" and r["seed"] == 2 and r["lr"] == plans[1].chosen)
    done[ga2]["test_outcomes"]["loss"]["order"] = "another tokenizer"  # other examples, or another order
    assert {r["arm"]: r for r in rows(cfg, plans, done)}["GA"]["delta_basis"] == "seeds"
    del done[ga2]["test_outcomes"]
    assert {r["arm"]: r for r in rows(cfg, plans, done)}["GA"]["delta_basis"] == "seeds"  # one seed lacks them


def test_the_fingerprint_follows_the_examples_and_their_order():
    import torch

    a = [{"input_ids": torch.tensor([[1, 2], [3, 4]]), "answers": ("x", "y")}]
    same = [{"answers": ("x", "y"), "input_ids": torch.tensor([[1, 2], [3, 4]])}]
    swapped = [{"input_ids": torch.tensor([[3, 4], [1, 2]]), "answers": ("y", "x")}]
    other_dtype = [{"input_ids": torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), "answers": ("x", "y")}]
    fp = outcomes.fingerprint
    assert fp(a) == fp(same) and len({fp(a), fp(swapped), fp(other_dtype)}) == 3
