"""Runs travel through the runner as typed records (``lowrank_ablation.records``): every field a spec or a record
carries is declared with its type, the committed results files are records of that type line by line, and
``read_records`` skips a line that is not one."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from lowrank_ablation import presets
from lowrank_ablation.config import load
from lowrank_ablation.records import RunRecord, RunSpec, problems
from lowrank_ablation.run import read_records, train_one
from lowrank_ablation.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "experiments" / "results").glob("*.jsonl"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_committed_results_line_is_a_run_record(path):
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert lines
    bad = {i: problems(r) for i, r in enumerate(lines, 1) if problems(r)}
    assert not bad, f"{path.name}: {dict(list(bad.items())[:3])}"
    declared = set(typing.get_type_hints(RunRecord))
    assert not {k for r in lines for k in r} - declared  # nothing written that the type does not declare


def test_a_planned_spec_and_a_real_record_carry_only_declared_fields(tmp_path):
    cfg = load(presets.path("synthetic-fair"))
    arm = next(a for a in cfg.arms if a.name == "LoRA")
    spec = {**cfg.spec(arm, 4, 1e-2, 0, "final"), "steps": 4, "eval_every": 2}
    assert problems(spec, RunSpec) == [] and set(spec) <= set(typing.get_type_hints(RunSpec))
    record = train_one(make_task("synthetic-lowrank", cfg.task), spec, progress=False)
    assert problems(record) == [] and set(record) <= set(typing.get_type_hints(RunRecord))
    assert record["status"] == "ok" and len(record["loss_curve"]) == 4


def test_a_line_of_the_wrong_type_is_skipped_and_counted(tmp_path, capsys):
    good = json.loads(RESULTS[0].read_text().splitlines()[0])
    path = tmp_path / "r.jsonl"
    lines = [good, {**good, "lr": "fast"}, {**good, "loss_curve": [1.0, "x"]}, {k: v for k, v in good.items()
                                                                               if k != "status"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_records(path) == [good]
    assert "skipped 3 line(s)" in capsys.readouterr().err
    assert problems({**good, "rank": None}) == []  # full fine-tuning's rank
    assert problems({**good, "rank": True}) == [f"'rank' = True is not {typing.get_type_hints(RunRecord)['rank']}"]


def test_a_record_that_would_not_read_back_is_refused_before_it_is_written(tmp_path):
    import numpy as np

    from lowrank_ablation.run import append_record

    good = json.loads(RESULTS[0].read_text().splitlines()[0])
    path = tmp_path / "r.jsonl"
    append_record(path, {**good, "val": {k: np.float32(0.5) for k in good["val"]}})  # numpy numbers are numbers
    with pytest.raises(ValueError, match="evaluate"):
        append_record(path, {**good, "test": {"accuracy": "high"}})  # a plug-in task breaking the contract
    assert len(read_records(path)) == 1
