"""Learning-rate search and transfer in the ablation runner, the three splits, and the statistics
(intervals, paired verdicts) of its summary. The search policy is tested on hand-made validation
curves (no training); one end-to-end sweep per mode trains the synthetic task for real."""

from __future__ import annotations

import json
import math

import pytest

from experiments.ablate import main
from lowrank_ablation.config import load
from lowrank_ablation.run import read_records
from lowrank_ablation.search import plan_sweep
from lowrank_ablation.verdicts import mean_ci, paired, verdict
from lowrank_ablation.curves import steps_to
from lowrank_ablation.summary import rows

CONFIG = """\
# python -m experiments.ablate {path}
[sweep]
name = "s"
task = "synthetic-lowrank"
results = "{results}"
seeds = [0, 1, 2]
ranks = [2]
lrs = "{mode}"
steps = {steps}
batch_size = 16
eval_every = 5
reference = "LoRA"
[search]
start = 1e-2
factor = 3.0
points = 3
max_points = {max_points}
seeds = [0]
[task]
d_in = 16
hidden = 24
d_out = 8
true_rank = 2
n_val = 64
n_test = 64
[[arm]]
name = "LoRA"
[[arm]]
name = "GA"
init = "lora_ga"
scaling = "rslora"
init_options = {{ progress = false }}
"""


def config(tmp_path, mode="search", max_points=9, steps=20):
    path = tmp_path / "s.toml"
    path.write_text(CONFIG.format(path=path, results=tmp_path / "s.jsonl", mode=mode, max_points=max_points,
                                  steps=steps))
    return load(path)


def record(spec, val_loss, test_loss=None, curve=None, status="ok"):
    return {**spec, "status": status, "loss_curve": curve or [1.0] * 10, "eval": [],
            "val": {"loss": val_loss if status == "ok" else None},
            "test": {"loss": (val_loss if test_loss is None else test_loss) if status == "ok" else None},
            "wall_time_s": 1.0}


def drive(cfg, val_of, test_of=None, diverges=lambda lr: False, test_of_run=None):
    """Answer every run the plan asks for with hand-made metrics until nothing is pending (``test_of_run``: the
    test metric from the whole run spec, seed included)."""
    done = {}
    for _ in range(100):
        plans = plan_sweep(cfg, done)
        todo = [r for p in plans for r in p.pending_search] or [r for p in plans for r in p.pending_final]
        if not todo:
            return plans, done
        for r in todo:
            bad = diverges(r["lr"])
            test = test_of_run(r) if test_of_run else test_of(r["arm"], r["lr"]) if test_of else None
            done[r["key"]] = record(r, val_of(r["arm"], r["lr"]), test, status="diverged" if bad else "ok")
    raise AssertionError("the plan did not terminate")


def tried(p):
    return sorted(p.scores)


def test_search_extends_until_the_best_rate_is_interior(tmp_path):
    cfg = config(tmp_path)
    # LoRA's validation loss is lowest at 0.09 (grid index +2), GA's at 0.01 (index 0).
    best = {"LoRA": 0.09, "GA": 0.01}
    plans, done = drive(cfg, lambda arm, lr: (math.log(lr) - math.log(best[arm])) ** 2)
    lora, ga = plans
    assert tried(lora) == pytest.approx([1e-2 / 3, 1e-2, 3e-2, 9e-2, 2.7e-1], rel=1e-5)  # 6 digits
    assert lora.chosen == pytest.approx(0.09) and lora.interior is True and lora.search_runs == 5
    assert tried(ga) == pytest.approx([1e-2 / 3, 1e-2, 3e-2], rel=1e-5) and ga.chosen == 0.01 and ga.interior
    # then the sweep's seeds at the chosen rate; the search's seed-0 run there is reused
    finals = [r for r in done.values() if r["arm"] == "LoRA" and r["lr"] == lora.chosen]
    assert sorted(r["seed"] for r in finals) == [0, 1, 2]
    assert [r["phase"] for r in sorted(finals, key=lambda r: r["seed"])] == ["search", "final", "final"]
    assert len(done) == 5 + 2 + 3 + 2


def test_search_stops_at_max_points_and_says_the_rate_is_not_interior(tmp_path):
    cfg = config(tmp_path, max_points=4)
    plans, _ = drive(cfg, lambda arm, lr: -lr)  # always better at a higher rate
    assert all(len(p.scores) == 4 and p.chosen == max(p.scores) and p.interior is False for p in plans)
    out = rows(cfg, plans, {r["key"]: r for r in []})
    assert all(r["lr_interior"] is False for r in out)


def test_a_grid_whose_every_rate_damages_the_model_extends_down(tmp_path):
    """Rule 3: the best rate ends worse than the model it started from (validation loss at step 0: 1.0), so the
    rates are too high; the grid extends below its lowest rate until one beats the start, then as rule 2 says."""
    def val(arm, lr):  # damaged (> 1.0) above 1e-3 with a false optimum at 1e-2; a real one at 1.2e-4
        return 2.0 + (math.log(lr / 1e-2)) ** 2 if lr >= 1e-3 else 0.9 + 0.01 * math.log(lr / 1.2345e-4) ** 2

    def started(cfg, done):
        return {k: {**r, "eval": [{"step": 0, "loss": 1.0}]} for k, r in done.items()}

    for max_points, chosen, n in [(9, 1e-2 / 81, 7), (4, 1e-2, 4)]:
        cfg = config(tmp_path, max_points=max_points)
        done = {}
        for _ in range(50):
            plans = plan_sweep(cfg, started(cfg, done))
            todo = [r for p in plans for r in p.pending_search] or [r for p in plans for r in p.pending_final]
            if not todo:
                break
            done.update({r["key"]: record(r, val(r["arm"], r["lr"])) for r in todo})
        assert all(p.chosen == pytest.approx(chosen, rel=1e-5) and len(p.scores) == n for p in plans), \
            [(p.chosen, tried(p)) for p in plans]
    # without a step-0 evaluation in the records the rule cannot apply: the false optimum is kept
    plans, _ = drive(config(tmp_path), val)
    assert all(p.chosen == pytest.approx(1e-2) and len(p.scores) == 3 for p in plans)


def test_selection_uses_validation_never_test(tmp_path):
    cfg = config(tmp_path)
    # validation prefers 0.01; test would prefer 0.03
    plans, _ = drive(cfg, lambda arm, lr: abs(math.log(lr / 0.01)), lambda arm, lr: abs(math.log(lr / 0.03)))
    assert all(p.chosen == 0.01 for p in plans)


def test_diverged_rates_score_worst_and_ties_go_to_the_lower_rate(tmp_path):
    cfg = config(tmp_path)
    plans, _ = drive(cfg, lambda arm, lr: 1.0, diverges=lambda lr: lr > 0.02)  # flat below 0.02, diverged above
    for p in plans:
        assert p.scores[0.03] == math.inf
        assert p.chosen == min(p.scores) and p.interior is False  # ties extend down to max_points
        assert len(p.scores) == 9


def test_paired_verdicts_and_steps_on_hand_made_runs(tmp_path):
    cfg = config(tmp_path)
    # GA: test loss lower than LoRA's by 0.1 +- 0.01 on every seed -> better; speed: reaches LoRA's final loss
    # at step 20 where LoRA needs 40 (plateaus, so the moving average is exact).
    ref_curve, ga_curve = [3.0] * 30 + [1.0] * 10, [3.0] * 10 + [1.0] * 30
    done = {}
    for _ in range(20):
        plans = plan_sweep(cfg, done)
        todo = [r for p in plans for r in p.pending_search] or [r for p in plans for r in p.pending_final]
        if not todo:
            break
        for r in todo:
            base = 0.5 + 0.01 * r["seed"]
            ga = r["arm"] == "GA"
            done[r["key"]] = record(r, abs(math.log(r["lr"] / 0.01)), base - (0.1 + 0.01 * (r["seed"] - 1)) * ga,
                                    ga_curve if ga else ref_curve)
    out = {r["arm"]: r for r in rows(cfg, plan_sweep(cfg, done), done)}
    assert out["LoRA"]["verdict"] == "reference" and out["LoRA"]["steps_to_reference_loss"] == 40
    ga = out["GA"]
    assert ga["n_seeds"] == 3 and ga["delta_vs_reference"] == pytest.approx(-0.1)
    assert ga["delta_ci"][1] < 0 and ga["verdict"] == "better"  # lower loss is better
    assert ga["steps_to_reference_loss"] == 20 and ga["speed_up"] == pytest.approx(2.0)
    for key in ("arm", "rank", "lr", "lr_interior", "n_seeds", "test_metric", "test_metric_ci",
                "delta_vs_reference", "delta_ci", "verdict"):
        assert key in ga


def test_mean_ci_is_the_student_t_interval():
    iv = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert iv.mean == 2.0 and iv.lo == pytest.approx(2 - half) and iv.hi == pytest.approx(2 + half)
    assert mean_ci([5.0]).ci is None and mean_ci([]).n == 0
    better = paired({0: 0.6, 1: 0.62, 2: 0.61}, {0: 0.5, 1: 0.5, 2: 0.52})
    assert verdict(better, higher_is_better=True) == "better" and verdict(better, higher_is_better=False) == "worse"
    noisy = paired({0: 0.6, 1: 0.4, 2: 0.55}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert verdict(noisy, True) == "no difference"
    assert paired({0: 1.0, 5: 2.0}, {0: 0.5, 1: 0.0}).n == 1  # only seeds both arms have


def test_steps_to_uses_the_moving_average():
    assert steps_to([3.0] * 30 + [1.0] * 10, 1.0) == 40 and steps_to([3.0] * 5, 1.0) is None


def test_search_sweep_end_to_end_with_json_summary(tmp_path, capsys):
    cfg = config(tmp_path, steps=10)
    assert main([str(cfg.path), "--no-progress"]) == 0
    records = read_records(cfg.sweep.results)
    assert {r["phase"] for r in records} == {"search", "final"}
    assert all(set(r["val"]) == {"loss"} and set(r["test"]) == {"loss"} for r in records)
    capsys.readouterr()
    n = len(records)
    assert main([str(cfg.path), "--no-progress"]) == 0 and len(read_records(cfg.sweep.results)) == n  # resumed
    capsys.readouterr()
    assert main([str(cfg.path), "--summary-only", "--json"]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["arm"] for o in objs] == ["LoRA", "GA"]
    for o in objs:
        assert o["n_seeds"] == 3 and o["lr"] in {r["lr"] for r in records if r["arm"] == o["arm"]}
        seeds = sorted(r["seed"] for r in records if r["arm"] == o["arm"] and r["lr"] == o["lr"])
        assert seeds == [0, 1, 2]
        assert len(o["test_metric_ci"]) == 2 and o["test_metric_ci"][0] <= o["test_metric"] <= o["test_metric_ci"][1]
    assert objs[0]["verdict"] == "reference" and objs[1]["verdict"] in {"better", "worse", "no difference"}
    assert (tmp_path / "s.md").exists() and (tmp_path / "s_lr.png").stat().st_size > 1000


def test_transfer_searches_only_the_reference_and_reports_against_a_full_search(tmp_path, capsys):
    search = config(tmp_path, steps=10)
    assert main([str(search.path), "--no-progress"]) == 0
    full = {p.arm: p for p in plan_sweep(search, {r["key"]: r for r in read_records(search.sweep.results)})}
    text = search.path.read_text().replace('lrs = "search"', 'lrs = "transfer"').replace('name = "s"', 'name = "t"')
    tpath = tmp_path / "t.toml"
    tpath.write_text(text.replace(str(search.path), str(tpath)))
    capsys.readouterr()
    assert main([str(tpath), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "transfer LoRA lr" in out.err
    store = json.loads((tmp_path / "s_transfer.json").read_text())
    (entry,) = store.values()
    assert entry["arm"] == "GA" and entry["reference_lr"] == full["LoRA"].chosen and entry["predicted_lr"] > 0
    tcfg = load(tpath)
    plans = {p.arm: p for p in plan_sweep(tcfg, {r["key"]: r for r in read_records(tcfg.sweep.results)}, store)}
    assert plans["LoRA"].mode == "search" and plans["GA"].mode == "transfer"
    ga = plans["GA"]
    center = tcfg.search.rate(tcfg.search.index(entry["predicted_lr"]))
    assert center in ga.scores and ga.search_runs >= 3
    assert "Transfer against a full search" in out.out and "| GA | 2 |" in out.out
    assert f"Search-phase runs: transfer {plans['LoRA'].search_runs + ga.search_runs}" in out.out


def test_results_lines_that_are_not_records_are_skipped(tmp_path, capsys):
    cfg = config(tmp_path, steps=4)
    assert main([str(cfg.path), "--no-progress"]) == 0
    path = cfg.sweep.results
    good = open(path, "rb").read()
    n = len(read_records(path))
    with open(path, "ab") as f:
        f.write(b'42\n{"foo": 1}\n\xff\xfe not utf-8\n[1, 2]\n')
    capsys.readouterr()
    assert len(read_records(path)) == n
    assert "skipped 4 line(s)" in capsys.readouterr().err
    assert main([str(cfg.path), "--no-progress"]) == 0  # resume and summary go on
    assert open(path, "rb").read().startswith(good) and len(read_records(path)) == n
