"""The ablation runner: config validation before any work, results lines, resume, divergence,
summary tables and plots; the Hugging Face text-classification path offline. Learning-rate search,
transfer and the statistics are in ``tests/test_ablation_search.py``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from experiments.ablate import main
from lowrank_ablation import presets
from lowrank_ablation.config import load
from lowrank_ablation.run import read_records
from lowrank_ablation.search import plan_sweep

SYNTH = """\
# python -m experiments.ablate {path}
[sweep]
name = "t"
task = "synthetic-lowrank"
results = "{results}"
seeds = [0, 1]
ranks = [2]
lrs = [1e-2]
steps = 8
batch_size = 16
eval_every = 4
reference = "LoRA"
[task]
d_in = 16
hidden = 24
d_out = 8
true_rank = 2
n_val = 64
n_test = 64
{arms}
"""
ARMS = """\
[[arm]]
name = "Full FT"
full_finetune = true
[[arm]]
name = "LoRA"
[[arm]]
name = "LoRA-GA"
init = "lora_ga"
scaling = "rslora"
init_options = {{ progress = false }}
"""


def write(tmp_path: Path, arms: str = ARMS, **replace) -> tuple[Path, Path]:
    results = tmp_path / "res" / "t.jsonl"
    text = SYNTH.format(path=tmp_path / "c.toml", results=results, arms=arms.replace("{{", "{").replace("}}", "}"))
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path, results


def test_sweep_writes_one_line_per_run_resumes_and_summarizes(tmp_path, capsys):
    cfg_path, results = write(tmp_path)
    assert main([str(cfg_path), "--no-progress"]) == 0
    records = read_records(results)
    assert len(records) == len(load(cfg_path).runs()) == 6  # full FT (no rank) + 2 LoRA arms, x 2 seeds
    r = records[0]
    for key in ("key", "arm", "rank", "lr", "seed", "phase", "val", "test", "loss_curve", "eval", "wall_time_s",
                "peak_memory_bytes", "lowrank_version", "status"):
        assert key in r
    assert isinstance(r["arm"], str) and r["phase"] == "final" and set(r["val"]) == set(r["test"]) == {"loss"}
    assert r["val"]["loss"] != r["test"]["loss"]  # two different splits
    assert len(r["loss_curve"]) == 8 and [e["step"] for e in r["eval"]] == [0, 4, 8]
    assert r["eval"][-1]["loss"] == r["val"]["loss"]  # the curve is on validation
    for rec in records:  # the forgetting metric: intruder dimensions of every target layer (full FT included)
        assert set(rec["intruders"]) == {"total", "layers", "layers_with", "top_k", "epsilon"}
        assert rec["intruders"]["layers"] == 2 and 0 <= rec["intruders"]["layers_with"] <= 2
    out = capsys.readouterr().out
    assert "| LoRA-GA | 2 | 0.01 |" in out and "speed-up" in out and "intruder dims |" in out
    assert (results.parent / "t.md").exists() and (results.parent / "t_curves.png").stat().st_size > 1000
    # rerun: everything is already there, nothing is trained again
    assert main([str(cfg_path), "--no-progress"]) == 0
    assert len(read_records(results)) == 6
    assert "6 finished runs" in capsys.readouterr().err


def test_torn_last_line_is_ignored_and_the_run_redone(tmp_path):
    cfg_path, results = write(tmp_path)
    assert main([str(cfg_path), "--no-progress"]) == 0
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # a crash mid-write
    assert len(read_records(results)) == 5
    assert main([str(cfg_path), "--no-progress"]) == 0
    assert len(read_records(results)) == 6


def test_diverged_run_is_recorded_and_the_sweep_continues(tmp_path):
    arms = ARMS + '[[arm]]\nname = "Boom"\nlrs = [1e12]\n'
    cfg_path, results = write(tmp_path, arms=arms)
    assert main([str(cfg_path), "--no-progress"]) == 0
    records = read_records(results)
    status = {(r["arm"], r["seed"]): r["status"] for r in records}
    assert status[("Boom", 0)] == status[("Boom", 1)] == "diverged"
    boom = [r for r in records if r["arm"] == "Boom"]
    assert len(boom) == 2 and all(r["val"] == r["test"] == {"loss": None} for r in boom)
    assert status[("LoRA", 0)] == "ok" and len(status) == 8


@pytest.mark.parametrize("change,message", [
    ({'task = "synthetic-lowrank"': 'task = "mnist"'}, "unknown task 'mnist'"),
    ({"steps = 8": "steps = 8\nlearning_rate = 1"}, r"unknown key\(s\) \['learning_rate'\]"),
    ({"d_out = 8": "d_out = 8\nwidth = 3"}, r"\[task\]: unknown option\(s\) \['width'\] for task 'synthetic-lowrank'"),
    ({'init = "lora_ga"': 'init = "lora-ga"'}, "lora_ga"),
    ({"init_options = { progress = false }": "init_options = { sclae = 'stable' }"}, "sclae"),
    ({'name = "LoRA"\n': 'name = "LoRA"\npreconditioner = "riemanian"\n'}, "riemannian"),
    ({'name = "LoRA"\n': 'name = "LoRA"\noptimizer = "rmsprop"\n'}, r"optimizer must be one of \['adam', 'adamw', 'sgd'\]"),
    ({"full_finetune = true": 'full_finetune = true\noptimizer = "sgd"'}, "full fine-tuning trains with AdamW"),
    ({"# python -m experiments.ablate": "# run me"}, "first line must be the command"),
    ({"steps = 8": 'steps = "20"'}, "steps must be a positive integer, got '20'"),
    ({"steps = 8": "steps = 20.5"}, "steps must be a positive integer, got 20.5"),
    ({"seeds = [0, 1]": "seeds = [true]"}, "seeds must be a non-empty list of distinct non-negative integers"),
    ({"hidden = 24": "hidden = -3"}, "hidden must be a positive integer, got -3"),
    ({"n_val = 64": "n_eval = 64"}, r"unknown option\(s\) \['n_eval'\]"),
    ({"ranks = [2]": "ranks = [6]"}, r"arm 'LoRA-GA' at rank 6: .*'fc2'"),
    ({'reference = "LoRA"': 'reference = "Vanilla"'}, "reference arm 'Vanilla' is not one of the arms"),
    ({"lrs = [1e-2]": 'lrs = "grid"'}, "lrs must be a list of rates or one of \\['search', 'transfer'\\]"),
    ({"[task]": "[search]\nstart = 1e-2\n[task]"}, "only used with lrs"),
    ({"lrs = [1e-2]": 'lrs = "search"', "[task]": "[search]\nwidth = 3\n[task]"},
     r"\[search\]: unknown key\(s\) \['width'\]"),
    ({"lrs = [1e-2]": 'lrs = "search"', "[task]": "[search]\nfactor = 1.0\n[task]"}, "factor must be a number > 1"),
    ({"lrs = [1e-2]": 'lrs = "search"', "[task]": "[search]\npoints = 4\n[task]"},
     "points must be an odd positive integer"),
    ({"lrs = [1e-2]": 'lrs = "search"', "[task]": "[search]\npoints = 5\nmax_points = 3\n[task]"},
     "max_points must be an integer >= points"),
    ({"lrs = [1e-2]": 'lrs = "search"', "[task]": '[search]\nselect = "val_accuracy"\n[task]'},
     r"select = 'val_accuracy' is not a metric of this task; choose one of \['val_loss'\]"),
    ({"lrs = [1e-2]": 'lrs = "search"', "[task]": '[search]\nselect = "test_loss"\n[task]'},
     "not a metric of this task"),
    ({"lrs = [1e-2]": 'lrs = "transfer"', 'reference = "LoRA"': 'reference = "Base"'},
     "reference arm 'Base' is not one of the arms.*transfers the reference arm's searched rate"),
    ({'name = "LoRA"\n': 'name = "LoRA"\nchain = "colla"\n'}, "unknown chain 'colla'; did you mean 'cola'"),
    ({'name = "LoRA"\n': 'name = "LoRA"\nchain = "cola"\nchain_options = { link_steps = 8 }\n'},
     r"link_steps=8 is not shorter than the run \(8 steps\)"),
    ({'name = "LoRA"\n': 'name = "LoRA"\nchain_options = { links = 2 }\n'}, "chain_options without a chain"),
    ({'name = "LoRA"\n': 'name = "LoRA"\nchain = "xgblora"\nchain_options = { links = 4 }\n'}, r"arm 'LoRA' at rank 2: xgblora trains rank-1 boosters"),
    ({"full_finetune = true": 'full_finetune = true\nchain = "cola"'}, "full fine-tuning has no adapters to chain"),
])
def test_bad_config_is_rejected_before_anything_runs(tmp_path, capsys, change, message):
    cfg_path, results = write(tmp_path, **change)
    assert main([str(cfg_path), "--no-progress"]) == 2
    import re
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not results.exists()


def test_presets_are_valid_and_the_demo_is_small():
    root = Path(presets.__file__).parent
    for name in presets.names():  # the paper's presets ask for CUDA: tests/test_paper_presets.py runs them small
        assert presets.text(name).startswith(f"# lowrank ablate {name}\n")
        if not name.startswith("paper/"):
            assert load(presets.path(name)).command == f"lowrank ablate {name}"
    demo = load(root / "demo.toml")
    assert [a.name for a in demo.arms] == ["Full FT", "LoRA", "PiSSA", "LoRA-GA"] and len(demo.runs()) == 4
    # each arm at the rate fair-ablation's search chose for it (replayed from the committed results)
    fair = load(root / "fair-ablation.toml")
    results = Path(__file__).resolve().parents[1] / "experiments" / "results" / "fair-ablation.jsonl"
    chosen = {p.arm: p.chosen for p in plan_sweep(fair, {r["key"]: r for r in read_records(results)})}
    assert all(chosen[a.name] for a in demo.arms)
    assert {a.name: a.lrs for a in demo.arms} == {a.name: [chosen[a.name]] for a in demo.arms}
    assert all(a.identity() == next(f for f in fair.arms if f.name == a.name).identity() for a in demo.arms)
    assert fair.sweep.lrs == "search" and fair.sweep.seeds == [0, 1, 2] and len(fair.arms) == 31
    assert {"LoRA", "LoRA-GA", "LoRA-GA + riemannian", "EVA", "CorDA", "GoRA", "LoRA-GA (PEFT's)", "Orthogonal",
            "Init[AB]", "MiCA", "LoRA-DA", "GraLoRA", "RandLoRA", "KaSA", "LoFT", "Full FT"} <= {a.name for a in fair.arms}
    assert load(root / "fair-ablation-transfer.toml").sweep.lrs == "transfer"


def test_hf_text_classification_from_local_files(tmp_path):
    """Any HF classifier + dataset by name or path: here the offline MiniLM and a local CSV."""
    from lowrank_ablation.data.minilm import minilm_path

    rows = [("a small furry animal", "animal"), ("a large striped cat", "animal"), ("a fast red car", "artifact"),
            ("a wooden table", "artifact")] * 6
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,kind\n" + "\n".join(f"{t},{k}" for t, k in rows))
    text = textwrap.dedent(f"""\
        # python -m experiments.ablate {tmp_path}/h.toml
        [sweep]
        name = "h"
        task = "hf-text-classification"
        results = "{tmp_path}/h.jsonl"
        steps = 2
        batch_size = 4
        eval_every = 2
        ranks = [2]
        [task]
        model = "{minilm_path()}"
        dataset = "{csv}"
        text_column = "sentence"
        label_column = "kind"
        n_val = 4
        n_test = 4
        init_batches = 1
        [[arm]]
        name = "LoRA"
        [[arm]]
        name = "LoRA-GA"
        init = "lora_ga"
        scaling = "rslora"
        init_options = {{ progress = false }}
        """)
    (tmp_path / "h.toml").write_text(text)
    assert main([str(tmp_path / "h.toml"), "--no-progress"]) == 0
    records = read_records(tmp_path / "h.jsonl")
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(0 <= r["val"]["accuracy"] <= 1 and 0 <= r["test"]["accuracy"] <= 1 for r in records)
    line = json.loads((tmp_path / "h.jsonl").read_text().splitlines()[0])
    assert line["task_options"]["dataset"] == str(csv)


def _torchrun_like(rank: int, world: int, port: int, cfg_path: str, out: str) -> None:
    import os

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch

    torch.set_num_threads(1)
    code = main([cfg_path, "--no-progress"])
    Path(out, f"rank{rank}.code").write_text(str(code))


@pytest.mark.parametrize("mode", ["list", "search"])
def test_sweep_under_two_processes_writes_results_once(tmp_path, mode):
    """What ``torchrun --nproc-per-node 2 -m experiments.ablate CONFIG`` does: DDP runs, rank 0 writes; under a
    search every rank plans from rank 0's records, so both take the same decisions."""
    import socket

    import torch.multiprocessing as mp

    search = {"lrs = [1e-2]": 'lrs = "search"', "[task]": "[search]\nstart = 1e-2\nmax_points = 4\n[task]"}
    cfg_path, results = write(tmp_path, arms=ARMS.replace('[[arm]]\nname = "Full FT"\nfull_finetune = true\n', ""),
                              **(search if mode == "search" else {}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torchrun_like, args=(2, port, str(cfg_path), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}.code").read_text() for r in range(2)] == ["0", "0"]
    records = read_records(results)
    assert all(r["world_size"] == 2 and r["status"] == "ok" for r in records)
    if mode == "list":
        assert len(records) == 4
    else:  # 3 to 4 search rates per arm (seed 0), then seed 1 at the chosen rate; no run twice
        assert len({r["key"] for r in records}) == len(records) >= 2 * (3 + 1)
        assert {r["phase"] for r in records} == {"search", "final"}


def test_an_sgd_base_arm_trains_its_adapters_by_sgd_and_the_head_by_adamw_at_head_lr():
    """``optimizer = "sgd"`` (LoFT's arms): the head is not what differs between arms, so it keeps AdamW."""
    from types import SimpleNamespace

    import torch

    from lowrank_ablation.run import _optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(6, 5))
    model.add_module("classifier", torch.nn.Linear(5, 3))
    built = SimpleNamespace(head=["classifier"], targets=["body"], init_batches=[])
    arm = {"full_finetune": False, "init": "kaiming", "init_options": {}, "scaling": "rslora", "adapter": "lora",
           "preconditioner": "loft", "preconditioner_options": {}, "optimizer": "sgd"}
    opt = _optimizer(model, {"arm_config": arm, "lr": 0.1, "rank": 2, "alpha": 2, "seed": 0, "head_lr": 1e-3}, built)
    adapters, head = opt.optimizers
    assert isinstance(adapters.base, torch.optim.SGD) and isinstance(head, torch.optim.AdamW)
    assert {id(p) for g in head.param_groups for p in g["params"]} == {id(p) for p in model.classifier.parameters()}
    assert all(g["lr"] == 1e-3 for g in head.param_groups)
    assert all(g["lowrank_role"] != "other" for g in adapters.param_groups)
    assert all(p.requires_grad for p in model.classifier.parameters())  # left trainable
    before = model.classifier.weight.detach().clone()
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    step = (model.classifier.weight.detach() - before).abs()
    assert torch.allclose(step, torch.full_like(step, 1e-3), rtol=1e-2)  # AdamW's first step: lr * sign(grad)


def test_chain_arms_run_and_their_records_count_the_links(tmp_path):
    arms = ARMS + ('[[arm]]\nname = "COLA"\nchain = "cola"\nchain_options = {{ links = 2 }}\n'
                   '[[arm]]\nname = "XGBLoRA"\nchain = "xgblora"\nranks = [1]\nchain_options = {{ links = 4, layers = 1 }}\n')
    cfg_path, results = write(tmp_path, arms=arms)
    assert main([str(cfg_path), "--no-progress"]) == 0
    records = {(r["arm"], r["seed"]): r for r in read_records(results)}
    assert records[("COLA", 0)]["links"] == 2 and records[("XGBLoRA", 1)]["links"] == 4
    assert records[("XGBLoRA", 0)]["rank"] == 1 and "links" not in records[("LoRA", 0)]
    assert all(r["status"] == "ok" for r in records.values())


def test_a_lora2_arm_prunes_its_triplets_and_adds_its_orthogonality_term(tmp_path, monkeypatch):
    from lowrank.adapters import lora2

    calls = {"loss": 0, "budgets": []}
    real_loss, real_step = lora2.lora2_loss, lora2.LoRA2Pruner.step

    def loss(model, coef=None):
        calls["loss"] += 1
        return real_loss(model, coef)

    def step(self):
        out = real_step(self)
        calls["budgets"].append(out)
        return out

    monkeypatch.setattr(lora2.LoRA2Layer, "auxiliary_loss", staticmethod(loss))
    monkeypatch.setattr(lora2.LoRA2Pruner, "step", step)
    arms = ARMS + ('[[arm]]\nname = "LoRA2"\nadapter = "lora2"\ninit = "lora2"\ninit_options = {{ k = 2 }}\n'
                   'adapter_options = {{ k = 2, target_rank = 1, mask_interval = 1 }}\n')
    cfg_path, results = write(tmp_path, arms=arms)
    assert main([str(cfg_path), "--no-progress"]) == 0
    records = {(r["arm"], r["seed"]): r for r in read_records(results)}
    assert records[("LoRA2", 0)]["status"] == "ok"
    assert calls["loss"] == 16  # 8 steps x 2 seeds
    assert calls["budgets"][-1] == 2  # the target: 1 triplet for each of the 2 layers


def test_hf_text_classification_with_a_separate_test_source(tmp_path, capsys):
    """test_dataset: its own columns and split, labels matched by name, overlapping texts never trained on."""
    from lowrank_ablation import make_task
    from lowrank_ablation.data.minilm import minilm_path

    rows = [(f"a small furry animal number {i}", "animal") for i in range(12)] + \
           [(f"a fast red car number {i}", "artifact") for i in range(12)]
    csv = tmp_path / "train.csv"
    csv.write_text("sentence,kind\n" + "\n".join(f"{t},{k}" for t, k in rows))
    test = tmp_path / "test.jsonl"  # another source: other columns, labels in another order, one text shared
    test.write_text("\n".join(json.dumps({"s": t, "y": k}) for t, k in [
        ("a slow blue truck", "artifact"), ("a tiny grey mouse", "animal"), (rows[0][0], "animal")]))
    opts = {"model": minilm_path(), "dataset": str(csv), "text_column": "sentence", "label_column": "kind",
            "n_val": 4, "n_test": 10, "init_batches": 1, "test_dataset": str(test), "test_text_column": "s",
            "test_label_column": "y"}
    task = make_task("hf-text-classification", opts)
    names = task.train_ds.features["label"].names
    assert [(t, names[y]) for t, y in zip(task.test_ds["text"], task.test_ds["label"])] == [
        ("a slow blue truck", "artifact"), ("a tiny grey mouse", "animal"), (rows[0][0], "animal")]
    assert rows[0][0] not in set(task.train_ds["text"]) | set(task.val_ds["text"])
    assert task.test_overlap_dropped == 1 and "dropped 1 training/validation example" in capsys.readouterr().err
    assert len(task.train_ds) + len(task.val_ds) == 23
    built = task.build(seed=0, batch_size=4)
    out = task.evaluate(built.model, built.test_batches)
    assert len(out["outcomes"]["accuracy"]) == 3 and sum(out["outcomes"]["accuracy"]) / 3 == out["accuracy"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"s": "a boat", "y": "vehicle"}))
    with pytest.raises(ValueError, match=r"label\(s\) \['vehicle'\] are not among the training labels"):
        make_task("hf-text-classification", {**opts, "test_dataset": str(bad)})
    with pytest.raises(ValueError, match=r"split 'train': no column\(s\) \['s', 'y'\]; its columns are \['sentence', 'kind'\]"):
        make_task("hf-text-classification", {**opts, "test_text_column": "s", "test_dataset": str(csv)})
    with pytest.raises(ValueError, match="test_text_column / test_label_column are set but test_dataset is not"):
        make_task("hf-text-classification", {k: v for k, v in opts.items() if k != "test_dataset"})


def test_unlabelled_test_rows_are_refused_not_read_as_the_last_class(tmp_path):
    import datasets

    from lowrank_ablation import make_task
    from lowrank_ablation.data.minilm import minilm_path

    rows = [(f"a small furry animal number {i}", "animal") for i in range(12)] + \
           [(f"a fast red car number {i}", "artifact") for i in range(12)]
    csv = tmp_path / "train.csv"
    csv.write_text("sentence,kind\n" + "\n".join(f"{t},{k}" for t, k in rows))
    classes = datasets.ClassLabel(names=["animal", "artifact"])
    test = datasets.Dataset.from_dict({"sentence": ["a cat", "a bus", "a dog"], "kind": [-1, -1, 0]},
                                      features=datasets.Features({"sentence": datasets.Value("string"),
                                                                  "kind": classes}))
    test.save_to_disk(str(tmp_path / "glue_like"))
    with pytest.raises(ValueError, match=r"label index\(es\) \[-1\] are not classes"):
        make_task("hf-text-classification", {"model": minilm_path(), "dataset": str(csv), "text_column": "sentence",
                                             "label_column": "kind", "n_val": 4, "n_test": 3, "init_batches": 1,
                                             "test_dataset": str(tmp_path / "glue_like")})
