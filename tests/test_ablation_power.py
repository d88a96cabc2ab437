"""Verdicts with power: the minimal detectable difference (checked by simulating paired t-tests at it), the
equivalence verdict, and both in the runner's summary and its config."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lowrank_ablation.config import load
from lowrank_ablation.verdicts import Interval, equivalence, mdd, mean_ci, paired, power
from lowrank_ablation.summary import markdown, rows
from tests.test_ablation_search import CONFIG, drive


def _rejection_rate(delta: float, sd: float, n: int, sims: int = 40_000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    d = rng.normal(delta, sd, size=(sims, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    return float((np.abs(t) > stats.t.ppf(0.975, n - 1)).mean())


@pytest.mark.parametrize("n", [3, 5, 10])
def test_mdd_is_detected_with_probability_080(n):
    delta = mdd(Interval(0.0, -1.0, 1.0, n, sd=0.7))
    assert delta > 0 and power(delta, 0.7, n) == pytest.approx(0.8, abs=1e-9)
    assert _rejection_rate(delta, 0.7, n) == pytest.approx(0.8, abs=0.01)  # 40k simulations: sd 0.002
    assert _rejection_rate(0.5 * delta, 0.7, n) < 0.7


def test_power_at_zero_is_the_level_and_mdd_shrinks_with_seeds():
    assert power(0.0, 1.0, 3) == pytest.approx(0.05)
    assert power(100.0, 1.0, 10) == pytest.approx(1.0)  # far tail: finite (scipy's nct gives nan there)
    m3, m5, m10 = (mdd(Interval(0, -1, 1, n, sd=1.0)) for n in (3, 5, 10))
    assert m3 > m5 > m10
    assert m10 == pytest.approx(1.0, abs=0.01)  # n = 10, d = 1: power 0.80 (textbook tables)
    assert math.isnan(mdd(mean_ci([0.1]))) and mdd(mean_ci([0.2, 0.2, 0.2])) == 0.0


def test_equivalence_verdicts():
    inside = paired({0: 0.51, 1: 0.50, 2: 0.52}, {0: 0.50, 1: 0.50, 2: 0.50})
    assert inside.hi < 0.05 and equivalence(inside, 0.05, True) == "equivalent"
    wide = paired({0: 0.6, 1: 0.4, 2: 0.55}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert equivalence(wide, 0.05, True) == "undecided"
    better = paired({0: 0.7, 1: 0.71, 2: 0.69}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert equivalence(better, 0.05, True) == "better" and equivalence(better, 0.05, False) == "worse"
    assert equivalence(better, 0.5, True) == "equivalent"  # inside a wide margin though it excludes 0
    assert equivalence(mean_ci([1.0]), 0.05, True) == "n/a"


def _config(tmp_path, margin: str):
    path = tmp_path / "s.toml"
    text = CONFIG.format(path=path, results=tmp_path / "s.jsonl", mode="search", max_points=9, steps=20)
    path.write_text(text.replace('reference = "LoRA"', f'reference = "LoRA"\n{margin}'))
    return load(path)


def test_margin_is_validated(tmp_path):
    with pytest.raises(ValueError, match="equivalence_margin"):
        _config(tmp_path, "equivalence_margin = -0.1")
    assert _config(tmp_path, "equivalence_margin = 0.02").sweep.equivalence_margin == 0.02
    assert _config(tmp_path, "").sweep.equivalence_margin is None


def test_summary_carries_mdd_and_equivalence(tmp_path):
    cfg = _config(tmp_path, "equivalence_margin = 0.05")
    # GA's test loss differs from LoRA's by 0.01 +- 0.01 over seeds: within the margin
    plans, done = drive(cfg, lambda arm, lr: abs(math.log(lr / 0.01)),
                        test_of_run=lambda r: 0.5 + (0.01 * (r["seed"] - 1) + 0.01) * (r["arm"] == "GA"))
    out = {r["arm"]: r for r in rows(cfg, plans, done)}
    ga, ref = out["GA"], out["LoRA"]
    assert ref["mdd"] is None and ref["equivalence"] is None
    diff = paired({s: 0.5 + 0.01 * (s - 1) + 0.01 for s in (0, 1, 2)}, {s: 0.5 for s in (0, 1, 2)})
    assert ga["mdd"] == pytest.approx(mdd(diff)) and ga["equivalence"] == equivalence(diff, 0.05, False)
    md = markdown(cfg, plans, done, list(out.values()))
    assert "detectable Δ (80% power)" in md and "within ±0.05" in md
    assert f"no difference larger than {max(abs(diff.lo), abs(diff.hi)):.3f}" in md
