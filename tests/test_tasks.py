"""Tasks as plug-ins: the registry (discovered from the package, declarations checked), a task from a
config's ``plugins`` module run end to end, metric directions read from the task (never from names), and
the causal-lm task through the whole runner (bf16, gradient checkpointing, a data-driven init)."""

from __future__ import annotations

import json
import math

import pytest

from experiments.ablate import main
from lowrank_ablation import presets
from lowrank_ablation import Task, list_tasks, make_task, register_task
from lowrank_ablation.config import load
from lowrank_ablation.outcomes import decode
from lowrank_ablation.run import read_records
from lowrank_ablation.search import plan_sweep
from lowrank_ablation.tasks import TASKS, get_task
from lowrank_ablation.tasks.base import restoring_modes

BUILT_IN = ["causal-lm", "causal-lm-code", "hf-text-classification", "seq2seq", "synthetic-lowrank",
            "wordnet-supersense"]


def test_built_in_tasks_are_discovered_from_their_package():
    assert set(BUILT_IN) <= set(list_tasks())
    assert list_tasks("causal*") == ["causal-lm", "causal-lm-code"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_task_declares_metrics_with_directions_and_valid_defaults(name):
    cls = get_task(name)
    assert cls.registry_name == name and cls.__doc__
    assert "loss" in cls.metrics and set(cls.metrics.values()) <= {"min", "max"} and cls.headline in cls.metrics
    assert set(cls.units) <= set(cls.metrics)


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown task 'causal_lm'; did you mean 'causal-lm', 'causal-lm-code'\? "
                                         r"\(see lowrank_ablation.list_tasks\(\)"):
        make_task("causal_lm", {})


@pytest.mark.parametrize("metrics,headline,message", [
    ({"loss": "lower"}, "loss", "metrics must map names to 'min' or 'max'"),
    ({"accuracy": "max"}, "accuracy", "include 'loss'"),
    ({"loss": "min"}, "bleu", "headline 'bleu' is not one of its metrics"),
])
def test_a_task_declaration_is_checked_at_registration(metrics, headline, message):
    with pytest.raises(ValueError, match=message):
        register_task("bad-task", type("Bad", (Task,), {"metrics": metrics, "headline": headline}))
    assert "bad-task" not in TASKS
    with pytest.raises(TypeError, match="must subclass"):
        register_task("not-a-task", object)


PLUGIN = '''
from dataclasses import dataclass
from lowrank_ablation import register_task
from lowrank_ablation.tasks.synthetic_lowrank import SyntheticLowRank

@register_task("{name}")
class Bigger(SyntheticLowRank):
    """The synthetic task, with a "max" metric that the search must maximize."""

    @dataclass(frozen=True)
    class Options(SyntheticLowRank.Options):
        margin: float = 1.0

    metrics = {{"loss": "min", "score": "max"}}
    headline = "score"

    def evaluate(self, model, batches, progress=False):
        out = super().evaluate(model, batches, progress)
        return {{**out, "score": self.options.margin - out["loss"]}}
'''

PLUGIN_CONFIG = """\
# my-lab-runner {path}
plugins = ["{module}"]
[sweep]
name = "p"
task = "{name}"
results = "{results}"
seeds = [0]
ranks = [2]
lrs = [1e-2, 3e-2]
steps = 4
batch_size = 8
eval_every = 4
[task]
d_in = 8
hidden = 12
d_out = 4
true_rank = 1
n_val = 16
n_test = 16
margin = 2.0
[[arm]]
name = "LoRA"
"""


def test_a_task_from_a_plugins_module_runs_end_to_end(tmp_path, capsys):
    name, module = "plugin-synthetic", "lowrank_test_plugin_task"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=name))
    cfg_path = tmp_path / "p.toml"
    cfg_path.write_text(PLUGIN_CONFIG.format(path=cfg_path, module=module, name=name, results=tmp_path / "p.jsonl"))
    try:
        assert main([str(cfg_path), "--no-progress"]) == 0
        records = read_records(tmp_path / "p.jsonl")
        assert len(records) == 2 and all(set(r["val"]) == {"loss", "score"} for r in records)
        assert all(r["val"]["score"] == pytest.approx(2.0 - r["val"]["loss"]) for r in records)
        cfg = load(cfg_path)
        assert cfg.command == f"my-lab-runner {cfg_path}" and cfg.select == "val_score"
        (p,) = plan_sweep(cfg, {r["key"]: r for r in records})
        assert p.chosen == max(p.scores, key=p.scores.get)  # "max" read from the task, not from the name
        assert "| LoRA | 2 |" in capsys.readouterr().out
    finally:
        TASKS.unregister(name)


@pytest.mark.parametrize("plugins,message", [
    ('["no_such_module_here"]', r"plugins: module 'no_such_module_here' does not import \(ModuleNotFoundError"),
    ('"one_module"', "plugins must be a list of module names"),
])
def test_a_plugins_entry_that_does_not_import_is_named(tmp_path, capsys, plugins, message):
    cfg_path = tmp_path / "p.toml"
    text = PLUGIN_CONFIG.format(path=cfg_path, module="x", name="synthetic-lowrank", results=tmp_path / "p.jsonl")
    cfg_path.write_text(text.replace('plugins = ["x"]', f"plugins = {plugins}").replace("margin = 2.0\n", ""))
    assert main([str(cfg_path), "--no-progress"]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "p.jsonl").exists()


def test_without_plugins_the_first_line_must_run_the_runner(tmp_path):
    cfg_path = tmp_path / "p.toml"
    text = PLUGIN_CONFIG.format(path=cfg_path, module="x", name="synthetic-lowrank", results=tmp_path / "p.jsonl")
    cfg_path.write_text(text.replace('plugins = ["x"]\n', "").replace("margin = 2.0\n", ""))
    with pytest.raises(ValueError, match="first line must be the command that runs it"):
        load(cfg_path)


def test_restoring_modes_restores_each_module():
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    m.train()
    m[1].eval()
    with restoring_modes(m):
        assert not any(x.training for x in m.modules())
    assert [x.training for x in m.modules()] == [True, True, False]


LM_CONFIG = """\
# python -m experiments.ablate {path}
[sweep]
name = "lm"
task = "causal-lm"
results = "{results}"
seeds = [0]
ranks = [2]
lrs = {lrs}
steps = 3
batch_size = 4
eval_every = 3
dtype = "{dtype}"
gradient_checkpointing = {gc}
{search}
[task]
model = "{model}"
data = "{data}"
n_train = 24
n_val = 6
n_test = 6
init_batches = 2
max_new_tokens = 3
[[arm]]
name = "LoRA"
[[arm]]
name = "LoRA-GA"
init = "lora_ga"
scaling = "rslora"
init_options = {{ progress = false }}
[[arm]]
name = "Full FT"
full_finetune = true
"""


def lm_config(tmp_path, tiny_lm_dir, dtype="float32", gc="false", lrs="[1e-3]", search=""):
    from .test_causal_lm import write_jsonl

    data = write_jsonl(tmp_path / "arith.jsonl", n=40)
    path = tmp_path / "lm.toml"
    path.write_text(LM_CONFIG.format(path=path, results=tmp_path / "lm.jsonl", model=tiny_lm_dir, data=data,
                                     dtype=dtype, gc=gc, lrs=lrs, search=search))
    return path


@pytest.mark.parametrize("dtype,gc", [("float32", "false"), ("bfloat16", "true")])
def test_causal_lm_through_the_runner(tmp_path, tiny_lm_dir, capsys, dtype, gc):
    path = lm_config(tmp_path, tiny_lm_dir, dtype, gc)
    assert main([str(path), "--no-progress"]) == 0
    records = read_records(tmp_path / "lm.jsonl")
    assert [r["arm"] for r in records] == ["LoRA", "LoRA-GA", "Full FT"]
    for r in records:
        assert r["status"] == "ok" and set(r["val"]) == set(r["test"]) == {"loss", "exact_match"}
        assert 0 <= r["test"]["exact_match"] <= 1 and math.isfinite(r["test"]["loss"])
        assert [e["step"] for e in r["eval"]] == [0, 3] and len(r["loss_curve"]) == 3
        assert (r.get("dtype") == "bfloat16") == (dtype == "bfloat16")  # part of the run's key when not default
        kept = decode(r["test_outcomes"]["exact_match"])  # per example, for the crossed interval
        assert len(kept) == 6 and sum(kept) / 6 == pytest.approx(r["test"]["exact_match"])
        assert all("outcomes" not in e for e in r["eval"])  # validation outcomes are not kept
    assert len({r["test_outcomes"]["exact_match"]["order"] for r in records}) == 1  # one test set, one order
    out = capsys.readouterr().out
    assert "test exact_match" in out and "Δ test exact_match vs LoRA" in out
    assert (tmp_path / "lm_curves.png").stat().st_size > 10_000


def test_select_must_name_a_metric_of_the_task(tmp_path, tiny_lm_dir, capsys):
    path = lm_config(tmp_path, tiny_lm_dir, lrs='"search"', search='[search]\nselect = "val_accuracy"')
    assert main([str(path), "--no-progress"]) == 2
    assert "select = 'val_accuracy' is not a metric of this task; choose one of ['val_loss', 'val_exact_match']" \
        in capsys.readouterr().err


def test_lm_presets_are_valid():
    from pathlib import Path

    root = Path(presets.__file__).parent
    cfg = load(root / "lm-ablation.toml")
    assert cfg.sweep.task == "causal-lm" and cfg.sweep.lrs == "search" and cfg.sweep.seeds == [0, 1, 2]
    assert cfg.select == "val_exact_match" and cfg.higher_is_better(cfg.select)
    names = {a.name for a in cfg.arms}
    assert {"LoRA", "PiSSA", "MiLoRA", "OLoRA", "LoRA-GA", "DoRA", "EVA", "LoRA + riemannian", "Full FT", "Init[AB]",
            "LoFT", "GraLoRA", "RandLoRA", "Orthogonal", "MiCA", "LoRA-DA", "KaSA"} <= names
    assert cfg.task["model"] == "smollm2-135m"
    assert json.dumps(cfg.task)  # the [task] table is plain data (it is part of every run's key)



def test_prepare_casts_and_checkpoints_and_the_adapters_still_get_gradients():
    import torch

    import lowrank
    from lowrank_ablation.run import prepare

    from .conftest import batches, tiny_llama

    model = prepare(tiny_llama(), {"dtype": "bfloat16", "gradient_checkpointing": True}, torch.device("cpu"))
    assert model.model.gradient_checkpointing and all(p.dtype == torch.bfloat16 for p in model.parameters())
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["q_proj", "v_proj"], init="gaussian",
                                             init_options={"b_std": 0.01}), progress=False)
    model.train()
    model(**batches("llama", 1)[0]).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # non-reentrant checkpointing
