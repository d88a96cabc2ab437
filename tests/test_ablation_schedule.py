"""The runner's optimization settings beyond the rate: the learning-rate schedule (against transformers'
own schedules), gradient clipping and weight decay, validated in the config and part of a run's key."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.ablate import main
from lowrank_ablation.run import _Schedule, read_records, schedule_factor
from tests.test_ablation_search import CONFIG, config


@pytest.mark.parametrize("kind,ratio", [("cosine", 0.03), ("cosine", 0.0), ("constant", 0.1), ("cosine", 0.25)])
def test_schedule_equals_transformers_schedules(kind, ratio):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    steps = 137
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warm = math.ceil(ratio * steps)  # the Trainer's get_warmup_steps
    hf = (get_cosine_schedule_with_warmup(opt, warm, steps) if kind == "cosine"
          else get_constant_schedule_with_warmup(opt, warm))
    expected = [fn(s) for s in range(steps) for fn in hf.lr_lambdas]
    assert [schedule_factor(s, steps, kind, ratio) for s in range(steps)] == pytest.approx(expected, abs=1e-12)


def test_schedule_scales_every_group_from_its_own_rate():
    a, b = (torch.nn.Parameter(torch.zeros(1)) for _ in range(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 4e-3}])
    s = _Schedule(opt, {"steps": 10, "schedule": "cosine", "warmup_ratio": 0.2})
    s.before(1)  # warmup: 1 of 2 steps
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2e-3])
    s.before(6)  # cosine: (6 - 2) / 8 of the way down
    f = 0.5 * (1 + math.cos(math.pi * 0.5))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * f, 4e-3 * f])


@pytest.mark.parametrize("line,message", [
    ('schedule = "linear"', r"schedule must be one of \['constant', 'cosine'\], got 'linear'"),
    ("warmup_ratio = 1.5", r"warmup_ratio must be a number in \[0, 1\), got 1.5"),
    ("max_grad_norm = 0", "max_grad_norm must be a positive finite number"),
    ("weight_decay = -0.1", "weight_decay must be a finite number >= 0"),
])
def test_bad_settings_are_named(tmp_path, line, message):
    path = tmp_path / "s.toml"
    path.write_text(CONFIG.format(path=path, results=tmp_path / "s.jsonl", mode="search", max_points=9, steps=20)
                    .replace('reference = "LoRA"', f'reference = "LoRA"\n{line}'))
    from lowrank_ablation.config import load

    with pytest.raises(ValueError, match=message):
        load(path)


def test_settings_enter_the_run_key_only_when_set_and_train(tmp_path, monkeypatch):
    plain = config(tmp_path)
    spec = plain.spec(plain.arms[0], 2, 0.01, 0, "final")
    assert not {"schedule", "warmup_ratio", "max_grad_norm", "weight_decay"} & set(spec)
    path = tmp_path / "t.toml"
    extra = 'schedule = "cosine"\nwarmup_ratio = 0.1\nmax_grad_norm = 1.0\nweight_decay = 0.0'
    path.write_text(CONFIG.format(path=path, results=tmp_path / "t.jsonl", mode="search", max_points=9, steps=6)
                    .replace('lrs = "search"', "lrs = [0.01]").replace('reference = "LoRA"',
                                                                       f'reference = "LoRA"\n{extra}')
                    .replace("seeds = [0, 1, 2]", "seeds = [0]"))
    text = path.read_text()
    path.write_text(text[:text.index("[search]")] + text[text.index("[task]"):])  # a rate list: no search
    from lowrank_ablation import run

    seen, clipped = [], []
    before = run._Schedule.before

    def spy(self, step):  # the rate each update is taken with, and the optimizer's decay
        before(self, step)
        seen.append((step, [g["lr"] for g in self.groups], {g.get("weight_decay") for g in self.groups}))

    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(run._Schedule, "before", spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, n: clipped.append(n) or real_clip(ps, n))
    assert main([str(path), "--no-progress"]) == 0
    per_run = 6  # steps; two arms
    assert [s for s, _, _ in seen] == list(range(per_run)) * 2 and clipped == [1.0] * (2 * per_run)
    for step, lrs, decay in seen[:per_run]:  # LoRA: A and B groups at 0.01 x the schedule's factor
        assert lrs == pytest.approx([0.01 * schedule_factor(step, 6, "cosine", 0.1)] * len(lrs), abs=1e-15)
        assert decay == {0.0}
    assert seen[0][1][0] == 0.0 and seen[1][1][0] == pytest.approx(0.01)  # warmup of ceil(0.6) = 1 update
    records = read_records(tmp_path / "t.jsonl")
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    r = records[0]
    assert (r["schedule"], r["warmup_ratio"], r["max_grad_norm"], r["weight_decay"]) == ("cosine", 0.1, 1.0, 0.0)
    assert r["key"] != spec["key"] and r["lr"] == spec["lr"] and r["seed"] == spec["seed"]


def test_weight_decay_in_both_places_is_named():
    from lowrank_ablation.run import _options

    arm = {"preconditioner_options": {"weight_decay": 0.1, "ratio": 16.0}}
    assert _options(arm, {"arm": "LoRA+"}) == {"weight_decay": 0.1, "ratio": 16.0}
    assert _options({"preconditioner_options": {}}, {"arm": "a", "weight_decay": 0.0}) == {"weight_decay": 0.0}
    with pytest.raises(ValueError, match=r"arm 'LoRA\+': weight_decay is set both in \[sweep\] \(0.0\) and in"):
        _options(arm, {"arm": "LoRA+", "weight_decay": 0.0})
