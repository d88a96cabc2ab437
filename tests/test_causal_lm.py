"""The ``causal-lm`` task on a tiny random Llama with the real SmolLM2 tokenizer: sequences and labels, the
token-weighted loss, batched left-padded generation against one-prompt-at-a-time decoding, the model left
as found, disjoint splits from a jsonl file and from reasoning-gym, and bad input named before training."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_ablation import make_task


def write_jsonl(path, n=60, start=0, **extra):
    rows = [{"prompt": f"What is {a} plus {a + 3}?", "response": f"{2 * a + 3}", "answer": f"{2 * a + 3}", **extra}
            for a in range(start, start + n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def task(tiny_lm_dir, tmp_path_factory):
    data = write_jsonl(tmp_path_factory.mktemp("d") / "arith.jsonl")
    return make_task("causal-lm", {"model": tiny_lm_dir, "data": str(data), "n_train": 40, "n_val": 8,
                                   "n_test": 12, "init_batches": 2, "max_new_tokens": 4, "eval_batch_size": 5})


def test_sequence_is_prompt_response_eos_and_labels_mask_the_prompt_and_padding(task):
    built = task.build(seed=0, batch_size=4)
    batch = next(built.train)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    tok = task.tok
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        text = tok.decode(ids[:n])
        prompt, _, rest = text.partition("?")
        p = tok(prompt + "?")["input_ids"]
        assert ids[:len(p)].tolist() == p and (labels[:len(p)] == -100).all()
        assert (labels[n:] == -100).all()  # padding
        response = labels[len(p):n].tolist()
        assert response[-1] == tok.eos_token_id and -100 not in response
        assert response[:-1] == tok(rest.removesuffix(tok.eos_token), add_special_tokens=False)["input_ids"]


def test_loss_is_the_token_weighted_mean_nll_over_responses(task):
    built = task.build(seed=0, batch_size=4)
    model, batch = built.model, next(built.train)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    target = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1)
    keep = target != -100
    nll = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
    assert torch.allclose(model(**batch).loss.double(), nll.mean(), rtol=1e-5)
    # over a split: weighted by tokens, not by batches (batches of 5, 5, 2 examples of different lengths)
    test = built.test_batches
    assert [len(b["answers"]) for b in test] == [5, 5, 2]
    with torch.no_grad():
        parts = [(model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss.item(),
                  int((b["labels"][:, 1:] != -100).sum())) for b in test]
    expected = sum(loss * k for loss, k in parts) / sum(k for _, k in parts)
    assert task.evaluate(model, test)["loss"] == pytest.approx(expected, rel=1e-6)


def _greedy_alone(model, task, prompt_ids: list[int]) -> str:
    """Greedy decoding of one prompt, no padding, written out token by token (the reference for generate)."""
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        for _ in range(task.options.max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == task.tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return task.tok.decode(out, skip_special_tokens=True)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(task):
    built = task.build(seed=0, batch_size=4)
    model = built.model.eval()
    rows = task.train_set + task.val_set + task.test_set
    by_length = {len(r[0]): r for r in rows}  # prompts of 1- and 2-digit numbers differ in length
    mixed = task.eval_batch(list(by_length.values()))
    assert len(by_length) >= 2 and mixed["prompt_mask"][:, -1].all() and not mixed["prompt_mask"].all()  # left-padded
    for b in [mixed, *built.val_batches]:
        batched = task.generate(model, b)
        for i, text in enumerate(batched):
            p = b["prompt_ids"][i][b["prompt_mask"][i].bool()].tolist()
            assert text == _greedy_alone(model, task, p)


def test_exact_match_scores_generations_and_leaves_the_model_as_found(task):
    built = task.build(seed=0, batch_size=4)
    model = built.model
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back as they were
    model.lm_head.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    # references set to the model's own first lines: every prompt matches; to something else: none does
    own = [dict(b, answers=tuple(t.lstrip().splitlines()[0] if t.strip() else "" for t in task.generate(model, b)))
           for b in built.val_batches]
    assert task.evaluate(model, own)["exact_match"] == 1.0
    wrong = [dict(b, answers=tuple("no such answer" for _ in b["answers"])) for b in built.val_batches]
    assert task.evaluate(model, wrong)["exact_match"] == 0.0
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # per example, in the batches' order: the first example of each batch right, the others wrong
    first = [dict(b, answers=tuple(a if i == 0 else "no such answer" for i, a in enumerate(o["answers"])))
             for b, o in zip(built.val_batches, own)]
    out = task.evaluate(model, first)
    expected = [int(i == 0) for b in first for i in range(len(b["answers"]))]
    assert out["outcomes"] == {"exact_match": expected} and out["exact_match"] == pytest.approx(sum(expected) / 8)


def test_math_verify_compares_answers_as_mathematics(tiny_lm_dir, tmp_path, monkeypatch):
    opts = {"model": tiny_lm_dir, "data": str(write_jsonl(tmp_path / "d.jsonl")), "n_train": 20, "n_val": 4,
            "n_test": 4, "max_new_tokens": 2}
    exact, verified = (make_task("causal-lm", {**opts, "answer_compare": c}) for c in ("exact", "math-verify"))
    built = exact.build(seed=0, batch_size=4)
    said = ["The answer is \\boxed{1,000}", "3.0", "1/2", "7"]  # what the "model" generates
    batch = dict(built.val_batches[0], answers=("1000", "3", "0.5", "8"))
    for t in (exact, verified):
        monkeypatch.setattr(t, "generate", lambda model, b: said[:len(b["answers"])])
    assert verified.evaluate(built.model, [batch])["outcomes"] == {"exact_match": [1, 1, 1, 0]}
    assert exact.evaluate(built.model, [batch])["outcomes"] == {"exact_match": [0, 1, 0, 0]}
    with pytest.raises(ValueError, match=r"answer_compare must be one of \['exact', 'math-verify'\], got 'sympy'"):
        make_task("causal-lm", {**opts, "answer_compare": "sympy"})


def test_jsonl_splits_are_disjoint_and_repeated_prompts_dropped(tiny_lm_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", n=30)
    path.write_text(path.read_text() + path.read_text().splitlines()[3] + "\n")  # one prompt twice
    t = make_task("causal-lm", {"model": tiny_lm_dir, "data": str(path), "n_train": 100, "n_val": 5, "n_test": 5})
    prompts = [{task_prompt(t, r) for r in s} for s in (t.train_set, t.val_set, t.test_set)]
    assert [len(p) for p in prompts] == [20, 5, 5]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert "dropped 1 line(s) whose prompt repeats" in capsys.readouterr().err


def task_prompt(t, row) -> str:
    return t.tok.decode(row[0])


def test_reasoning_gym_splits_use_separate_seed_blocks():
    """reasoning-gym's item i of seed s is Random(s + i): seeds 0 and 1 overlap, so splits need seed blocks."""
    import reasoning_gym

    a, b = (reasoning_gym.create_dataset("chain_sum", size=5, seed=s) for s in (0, 1))
    assert a[1]["question"] == b[0]["question"]  # the pitfall the loader avoids
    from lowrank_ablation.data.examples import default_fields, load_splits

    data = "reasoning-gym:chain_sum"
    opts = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # only 2 x 9 x 10 = 180 problems
    train, val, test = load_splits(data, default_fields(data), 100, 20, 30, seed=0, options=opts)
    sets = [{e.prompt for e in s} for s in (train, val, test)]
    assert [len(s) for s in sets] == [100, 20, 30]  # distinct within each split
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert test == load_splits(data, default_fields(data), 50, 20, 30, seed=0, options=opts)[2]  # test fixed
    with pytest.raises(ValueError, match="gave only .* new distinct prompts .* widen the generator's options"):
        load_splits(data, default_fields(data), 1000, 20, 30, seed=0, options=opts)


@pytest.mark.parametrize("change,message", [
    ({"answer_pattern": "(unclosed"}, "answer_pattern '\\(unclosed' is not a valid regular expression"),
    ({"answer_pattern": "#### \\d+"}, "has no group; put the answer in parentheses"),
    ({"data": "problems.csv"}, "must be a .jsonl file, a 'hf:' datasets source or a generator such as 'reasoning-gym:chain_sum'"),
    ({"data": None}, "needs data ="),
    ({"n_val": 0}, "n_val must be a positive integer, got 0"),
    ({"max_lenght": 64}, r"unknown option\(s\) \['max_lenght'\] for task 'causal-lm'"),
    ({"chat_template": "yes"}, "chat_template='yes' of task 'causal-lm' must be true or false"),
])
def test_bad_options_are_named(tiny_lm_dir, tmp_path, change, message):
    opts = {"model": tiny_lm_dir, "data": str(write_jsonl(tmp_path / "d.jsonl")), **change}
    with pytest.raises(ValueError, match=message):
        make_task("causal-lm", {k: v for k, v in opts.items() if v is not None})


@pytest.mark.parametrize("line,message", [
    ({"prompt": "2+2", "answer": "4"}, r"d.jsonl:61: no field 'response' \(the response\).*set response_field"),
    ({"prompt": "", "response": "4", "answer": "4"}, "d.jsonl:61: the prompt .* is empty"),
    ({"prompt": "2+2", "response": "  ", "answer": "4"}, "d.jsonl:61: the response .* is empty"),
    ({"prompt": "add " * 200, "response": "4", "answer": "4"},
     r"d.jsonl:61: prompt \+ response \+ EOS is \d+ tokens .* over max_length = 128; raise max_length"),
])
def test_bad_lines_are_named_by_file_and_line(tiny_lm_dir, tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl")
    path.write_text(path.read_text() + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message):
        make_task("causal-lm", {"model": tiny_lm_dir, "data": str(path), "n_val": 5, "n_test": 5})


def test_field_names_and_chat_template_are_options(tiny_lm_dir, tmp_path):
    rows = [{"q": f"Name {i}?", "a": f"Reply {i}", "gold": f"{i}|#{i}"} for i in range(20)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    t = make_task("causal-lm", {"model": tiny_lm_dir, "data": str(path), "prompt_field": "q", "response_field": "a",
                                "answer_field": "gold", "chat_template": True, "n_val": 4, "n_test": 4})
    p, r, answer = t.train_set[0]
    text = t.tok.decode(p)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")  # one user turn
    assert t.tok.decode(r) .startswith("Reply ") and "|#" in answer


def test_separate_test_source_is_never_trained_on(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    # train on one source, test on another (GSM8K-shaped: question / answer ending in '#### N'); five test
    # prompts also occur in the training source and must be dropped from training and validation
    train = write_jsonl(tmp_path / "train.jsonl", n=60)
    rows = [{"question": f"What is {a} plus {a + 3}?", "answer": f"{a} + {a + 3} = {2 * a + 3}\n#### {2 * a + 3}"}
            for a in list(range(100, 115)) + list(range(0, 5))]
    test_path = tmp_path / "gsm.jsonl"
    test_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = make_task("causal-lm", {"model": tiny_lm_dir, "data": str(train), "n_train": 100, "n_val": 8, "n_test": 20,
                                "test_data": str(test_path), "test_prompt_field": "question",
                                "test_response_field": "answer", "test_answer_pattern": r"#### (\S+)",
                                "max_length": 64, "max_new_tokens": 4, "eval_batch_size": 7})
    assert "dropped 5 training/validation example(s)" in capsys.readouterr().err and t.test_overlap_dropped == 5
    prompt = lambda row: t.tok.decode(row[0], skip_special_tokens=True)  # noqa: E731
    test_prompts = {prompt(r) for r in t.test_set}
    assert len(t.test_set) == 20 and len(t.val_set) == 8 and len(t.train_set) == 60 - 8 - 5
    assert not test_prompts & {prompt(r) for r in t.train_set + t.val_set}
    # reference answers reduced by the test pattern: GSM8K's worked solution -> its '#### N'
    assert {r[2] for r in t.test_set} == {str(2 * a + 3) for a in list(range(100, 115)) + list(range(0, 5))}
    built = t.build(seed=0, batch_size=4)
    assert all("answer_pattern" in b for b in built.test_batches)
    assert not any("answer_pattern" in b for b in built.val_batches)
    # generations are read with the test rule ('#### N'), not the training source's first line
    monkeypatch.setattr(t, "generate", lambda model, b: [f"so\n#### {a}" for a in b["answers"]])
    assert t.evaluate(built.model, built.test_batches)["exact_match"] == 1.0
    assert t.evaluate(built.model, [dict(b, answer_pattern=None) for b in built.test_batches])["exact_match"] == 0.0


def test_test_source_options_need_test_data(tiny_lm_dir, tmp_path):
    with pytest.raises(ValueError, match="test_data is not"):
        make_task("causal-lm", {"model": tiny_lm_dir, "data": str(write_jsonl(tmp_path / "d.jsonl")),
                                "test_answer_pattern": "#### (.+)"})
    with pytest.raises(ValueError, match="fewer than n_test"):
        make_task("causal-lm", {"model": tiny_lm_dir, "data": str(write_jsonl(tmp_path / "d.jsonl")),
                                "test_data": str(write_jsonl(tmp_path / "t.jsonl", n=3, start=500)), "n_test": 10,
                                "n_val": 5})


def test_datasets_sources_by_configuration(tiny_lm_dir, tmp_path):
    # a save_to_disk folder (MetaMathQA-shaped fields) to train on, a parquet file (GSM8K-shaped) to test on
    import datasets

    n = 40
    datasets.Dataset.from_dict({"query": [f"What is {a} plus {a + 3}?" for a in range(n)],
                                "response": [f"{2 * a + 3}" for a in range(n)],
                                "answer": [f"{2 * a + 3}" for a in range(n)]}).save_to_disk(str(tmp_path / "mm"))
    datasets.Dataset.from_dict({"question": [f"What is {a} times 2?" for a in range(10)],
                                "answer": [f"{a} * 2 = {2 * a}\n#### {2 * a}" for a in range(10)]}
                               ).to_parquet(str(tmp_path / "gsm.parquet"))
    t = make_task("causal-lm", {"model": tiny_lm_dir, "data": f"hf:{tmp_path / 'mm'}", "prompt_field": "query",
                                "n_val": 5, "n_test": 10, "test_data": f"hf:{tmp_path / 'gsm.parquet'}",
                                "test_prompt_field": "question", "test_response_field": "answer",
                                "test_answer_pattern": r"#### (\S+)", "max_length": 64})
    assert len(t.train_set) == n - 5 and len(t.val_set) == 5
    assert sorted(int(r[2]) for r in t.test_set) == [2 * a for a in range(10)]
    assert t.tok.decode(t.test_set[0][0], skip_special_tokens=True).endswith("times 2?")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['subset'\]"):
        make_task("causal-lm", {"model": tiny_lm_dir, "data": f"hf:{tmp_path / 'mm'}", "prompt_field": "query",
                                "n_val": 5, "n_test": 5, "data_options": {"subset": "x"}})
    with pytest.raises(ValueError, match="no such file"):
        make_task("causal-lm", {"model": tiny_lm_dir, "data": f"hf:{tmp_path / 'none.parquet'}"})
    with pytest.raises(ValueError, match="names no source"):
        make_task("causal-lm", {"model": tiny_lm_dir, "data": "hf:"})


def test_prompt_template_and_drop_long(tiny_lm_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl")
    opts = {"model": tiny_lm_dir, "data": str(data), "n_train": 40, "n_val": 8, "n_test": 12}
    plain = make_task("causal-lm", opts)
    task = make_task("causal-lm", {**opts, "prompt_template": "Q: {prompt}\nA: "})
    assert task.prompt_ids("What is 1 plus 4?") == plain.tok("Q: What is 1 plus 4?\nA: ")["input_ids"]
    assert [p for p, _, _ in task.test_set] != [p for p, _, _ in plain.test_set]  # the test prompts too
    with pytest.raises(ValueError, match=r"prompt_template must be a string with one '\{prompt\}' field"):
        make_task("causal-lm", {**opts, "prompt_template": "Q: {question}"})
    # five training examples far longer than the rest: an error naming the fix, or dropped and counted
    long = tmp_path / "long.jsonl"
    long.write_text(data.read_text() + "".join(json.dumps({"prompt": f"Add these: {'1 + ' * 30}{k}", "response": "x",
                                                           "answer": "x"}) + "\n" for k in range(5)))
    test = write_jsonl(tmp_path / "t.jsonl", n=12, start=200)
    opts = {**opts, "data": str(long), "n_train": 57, "test_data": str(test)}  # every example used
    with pytest.raises(ValueError, match="over max_length = 40; .* or set drop_long = true"):
        make_task("causal-lm", {**opts, "max_length": 40})
    capsys.readouterr()
    kept = make_task("causal-lm", {**opts, "max_length": 40, "drop_long": True})
    assert kept.dropped_long == 5 and len(kept.train_set) + len(kept.val_set) == 60
    assert max(len(p) + len(r) for p, r, _ in kept.train_set + kept.val_set) <= 40
    assert "dropped 5 training/validation example(s) over max_length" in capsys.readouterr().err
    with pytest.raises(ValueError, match="t.jsonl:.* over max_length = 12"):  # a test example: never dropped
        make_task("causal-lm", {**opts, "max_length": 12, "drop_long": True})


def test_a_tokenizer_without_eos_is_named(tiny_lm_dir, tmp_path, monkeypatch):
    """A response (or target) ends with EOS: a tokenizer without one is refused before anything loads."""
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained

    def no_eos(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.eos_token = None
        return tok

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_eos)
    with pytest.raises(ValueError, match="its tokenizer has no EOS token, so a generated sequence has no end"):
        make_task("causal-lm", {"model": tiny_lm_dir, "data": str(write_jsonl(tmp_path / "d.jsonl"))})
