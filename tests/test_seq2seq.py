"""The ``seq2seq`` task on a tiny random T5 with the real SmolLM2 tokenizer: encoder inputs and decoder labels,
the token-weighted loss against a float64 NLL, batched generation against token-by-token greedy decoding,
per-example outcomes, the model left as found, the default targets on T5 v1.0 and gated v1.1, bad options and
lines named, a separate test source with its overlap dropped, and a LoRA / LoRA-GA sweep through the runner."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from lowrank_ablation import make_task

ADJECTIVES = ["gripping", "dull", "tender", "clumsy", "radiant", "tedious", "witty", "bland", "moving", "shallow"]
NOUNS = ["film", "story", "score", "cast", "script", "ending"]
GOOD = {"gripping", "tender", "radiant", "witty", "moving"}


def glue_rows(start=0, n=60):
    """GLUE as text to text: SST-2 (``"sst2 sentence: a gripping film"`` -> ``"positive"``) and, every third row,
    RTE (-> ``"entailment"`` / ``"not_entailment"``: targets of 3 and 5 tokens beside SST-2's 1)."""
    pairs = [(a, w) for w in NOUNS for a in ADJECTIVES]
    rows = []
    for i in range(start, start + n):
        a, w = pairs[i]
        if i % 3 == 2:
            rows.append({"input": f"rte sentence1: a {a} {w}. sentence2: the {w} is good.",
                         "target": "entailment" if a in GOOD else "not_entailment"})
        else:
            rows.append({"input": f"sst2 sentence: a {a} {w}", "target": "positive" if a in GOOD else "negative"})
    return rows


TARGETS = {r["input"]: r["target"] for r in glue_rows()}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _tiny_t5(tok, gated: bool = False):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)  # initializer_factor 3: generations that depend on the input (at 1, nearly constant)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                   dropout_rate=0.0, initializer_factor=3.0, feed_forward_proj="gated-gelu" if gated else "relu",
                   tie_word_embeddings=not gated, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)  # T5's convention: the decoder starts from pad
    return T5ForConditionalGeneration(cfg)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from lowrank_ablation.data import smollm2

    return AutoTokenizer.from_pretrained(smollm2.gguf_folder(), gguf_file=smollm2.GGUF)


@pytest.fixture(scope="module")
def t5_dir(tok, tmp_path_factory) -> str:
    """A tiny random T5 v1.0 (ReLU feed-forward, tied embeddings; d_model 32, 2 + 2 layers) and the SmolLM2
    tokenizer (pad = EOS = <|im_end|>), loadable with ``from_pretrained``."""
    path = tmp_path_factory.mktemp("tiny_t5")
    _tiny_t5(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "sst2.jsonl", glue_rows())


@pytest.fixture(scope="module")
def task(t5_dir, data):
    return make_task("seq2seq", {"model": t5_dir, "data": str(data), "n_train": 40, "n_val": 8, "n_test": 12,
                                 "init_batches": 2, "max_new_tokens": 4, "eval_batch_size": 5})


def test_the_task_is_registered_with_its_metrics():
    from lowrank_ablation import list_tasks
    from lowrank_ablation.tasks import get_task

    cls = get_task("seq2seq")
    assert "seq2seq" in list_tasks() and cls.registry_name == "seq2seq" and cls.__doc__
    assert "arXiv 2407.05000" in sys.modules[cls.__module__].__doc__
    assert cls.metrics == {"loss": "min", "exact_match": "max"} and cls.headline == "exact_match"
    assert set(cls.units) <= set(cls.metrics)
    assert cls.describe(cls.Options(model="google/t5-v1_1-base", data="glue/sst2.jsonl")) == "sst2.jsonl, t5-v1_1-base"


def test_batches_are_inputs_and_target_eos_labels_masked_on_padding(task):
    tok = task.tok
    built = task.build(seed=0, batch_size=4)
    batch = next(built.train)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (ids[n:] == task.pad_id).all()  # right padding
        text = tok.decode(ids[:n])
        assert text in TARGETS and ids[:n].tolist() == tok(text)["input_ids"]
        m = int((labels != -100).sum())
        assert (labels[:m] != -100).all() and (labels[m:] == -100).all()  # -100 only on padding, at the end
        target = labels[:m].tolist()
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]) == TARGETS[text]
    assert built.head == [] and len(built.init_batches) == 2
    assert all(set(b) == {"input_ids", "attention_mask", "labels", "answers"} for b in built.val_batches)
    assert [a for b in built.test_batches for a in b["answers"]] == [r[2] for r in sorted(
        task.test_set, key=lambda r: (len(r[0]), len(r[1])))]
    again = next(task.build(seed=0, batch_size=4).train)  # the stream is seeded
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def _nll64(model, b) -> tuple[float, int]:
    """The summed float64 NLL of a batch's labels under teacher forcing (decoder = start + labels shifted right)."""
    labels = b["labels"]
    dec = torch.full_like(labels, model.config.decoder_start_token_id)
    dec[:, 1:] = labels[:, :-1].clamp_min(0)  # any id after the last label: only later positions see it
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=dec).logits
    logp = torch.log_softmax(logits.double(), -1)
    keep = labels != -100
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
    return float(nll.sum()), int(keep.sum())


def test_loss_is_the_token_weighted_nll_over_target_tokens(task):
    built = task.build(seed=0, batch_size=4)
    model, batch = built.model.eval(), next(built.train)
    total, k = _nll64(model, batch)
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(total / k, rel=1e-5)  # the training loss
    # over a split: weighted by target tokens, not by batches (5, 5 and 2 examples, targets of different lengths)
    test = built.test_batches
    assert [len(b["answers"]) for b in test] == [5, 5, 2]
    assert any(((b["labels"] == -100).any(1) & (b["labels"] != -100).any(1)).any() for b in test)  # padded targets
    parts = [_nll64(model, b) for b in test]
    expected = sum(s for s, _ in parts) / sum(n for _, n in parts)
    assert task.evaluate(model, test)["loss"] == pytest.approx(expected, rel=1e-5)


def _greedy_alone(model, task, input_ids: list[int]) -> str:
    """Greedy decoding of one input, no padding, written out token by token (the reference for generate)."""
    enc = torch.tensor([input_ids])
    dec = torch.tensor([[model.config.decoder_start_token_id]])
    out = []
    with torch.no_grad():
        for _ in range(task.options.generation_limit):
            nxt = int(model(input_ids=enc, decoder_input_ids=dec).logits[0, -1].argmax())
            if nxt == task.tok.eos_token_id:
                break
            out.append(nxt)
            dec = torch.cat([dec, torch.tensor([[nxt]])], 1)
    return task.tok.decode(out, skip_special_tokens=True)


def test_batched_generation_equals_token_by_token_greedy_decoding(task):
    built = task.build(seed=0, batch_size=4)
    model = built.model.eval()
    rows = task.train_set + task.val_set + task.test_set
    by_length = {len(r[0]): r for r in rows}
    mixed = task.eval_batch(list(by_length.values()))
    assert len(by_length) >= 2 and not mixed["attention_mask"].all()  # padded inputs in one batch
    seen = []
    for b in [mixed, *built.val_batches]:
        batched = task.generate(model, b)
        for i, text in enumerate(batched):
            assert text == _greedy_alone(model, task, b["input_ids"][i][b["attention_mask"][i].bool()].tolist())
        seen += batched
    assert len(set(seen)) >= 3  # the inputs matter: a padding bug would show


def test_outcomes_are_per_example_and_the_model_is_left_as_found(task):
    built = task.build(seed=0, batch_size=4)
    model = built.model
    model.train()
    model.encoder.block[0].eval()  # mixed modes must come back as they were
    model.lm_head.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    # references set to the model's own first lines on the first batch only: exactly those examples match
    first, rest = built.val_batches[0], built.val_batches[1:]
    own = [t.lstrip().splitlines()[0] if t.strip() else "" for t in task.generate(model.eval(), first)]
    model.train()
    model.encoder.block[0].eval()
    batches = [dict(first, answers=tuple(own)), *(dict(b, answers=("no such answer",) * len(b["answers"]))
                                                  for b in rest)]
    out = task.evaluate(model, batches)
    n = sum(len(b["answers"]) for b in batches)
    hits = out["outcomes"]["exact_match"]
    assert set(out) == {"loss", "exact_match", "outcomes"} and set(out["outcomes"]) == {"exact_match"}
    assert len(hits) == n and set(hits) <= {0, 1} and all(isinstance(h, int) for h in hits)
    assert hits == [1] * len(first["answers"]) + [0] * (n - len(first["answers"]))  # in batch order
    assert out["exact_match"] == pytest.approx(sum(hits) / n)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    full = task.evaluate(model, built.val_batches)
    assert full["exact_match"] == pytest.approx(sum(full["outcomes"]["exact_match"]) / len(task.val_set))


@pytest.mark.parametrize("gated", [False, True], ids=["t5-v1.0", "t5-v1.1-gated"])
def test_default_targets_adapt_every_t5_block_linear_and_train(tok, gated):
    import lowrank
    from lowrank_ablation.tasks.seq2seq import Seq2Seq

    model = _tiny_t5(tok, gated)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert ({n.rsplit(".", 1)[-1] for n in linears} & {"wi_0", "wi_1", "wi"}) == ({"wi_0", "wi_1"} if gated else {"wi"})
    targets = Seq2Seq.Options(model="m", data="d.jsonl").targets
    assert targets == ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=targets,
                                             init="gaussian", init_options={"b_std": 0.01}), progress=False)
    assert {n for n, _ in lowrank.adapted_layers(model)} == {n for n in linears if n != "lm_head"}
    ids = torch.tensor([tok("sst2 sentence: a fine film")["input_ids"]])
    model.train()
    model(input_ids=ids, labels=torch.tensor([[16185, tok.eos_token_id]])).loss.backward()  # adapted model trains
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_wo_is_a_target_because_the_adapters_expose_the_base_weight(t5_dir, data):
    """T5's feed-forward reads ``self.wo.weight`` in every forward; the adapter around ``wo`` answers with its base
    layer's weight (as PEFT's layers do), so the adapted model runs and ``wo``'s factors get gradients."""
    import lowrank

    opts = {"model": t5_dir, "data": str(data), "n_val": 4, "n_test": 4}
    task = make_task("seq2seq", {**opts, "targets": ["wo"]})
    built = task.build(0, 4)
    model = built.model
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["wo"], init="gaussian", init_options={"b_std": 0.01}),
                   progress=False)
    layer = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert layer.weight is layer.base_layer.weight and not layer.weight.requires_grad
    model(**next(built.train)).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"targets \['q_proj'\] match no module of .* named \[.*'wi'"):
        make_task("seq2seq", {**opts, "targets": ["q_proj"]})


def test_batch_larger_than_the_training_set_is_an_error(t5_dir, data):
    t = make_task("seq2seq", {"model": t5_dir, "data": str(data), "n_train": 3, "n_val": 4, "n_test": 4})
    with pytest.raises(ValueError, match="batch_size = 4 is larger than the 3 training examples"):
        t.build(seed=0, batch_size=4)


@pytest.mark.parametrize("change,message", [
    ({"model": None}, "task 'seq2seq' needs model ="),
    ({"data": None}, "task 'seq2seq' needs data ="),
    ({"data": "pairs.csv"}, "must be a .jsonl file, a 'hf:' datasets source"),
    ({"n_val": 0}, "n_val must be a positive integer, got 0"),
    ({"max_target_length": -1}, "max_target_length must be a positive integer, got -1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
    ({"answer_pattern": "(unclosed"}, "answer_pattern '\\(unclosed' is not a valid regular expression"),
    ({"targets": []}, r"targets must be a module-name list or one regex, got \[\]"),
    ({"input_field": ""}, "input_field must be a field name, got ''"),
    ({"data_options": {"split": "train"}}, r"data_options = \{'split': 'train'\} only apply to a 'hf:' source"),
    ({"test_target_field": "label"}, "test_\\*_field are set but test_data is not"),
    ({"max_source_lenght": 64}, r"unknown option\(s\) \['max_source_lenght'\] for task 'seq2seq'"),
])
def test_bad_options_are_named(t5_dir, data, change, message):
    opts = {"model": t5_dir, "data": str(data), **change}
    with pytest.raises(ValueError, match=message):
        make_task("seq2seq", {k: v for k, v in opts.items() if v is not None})


def test_a_decoder_only_model_is_refused(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    cfg.save_pretrained(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", glue_rows(n=20))
    with pytest.raises(ValueError, match="not an encoder-decoder; .* for a decoder LM use task 'causal-lm'"):
        make_task("seq2seq", {"model": str(tmp_path), "data": str(data)})


@pytest.mark.parametrize("line,message", [
    ({"input": "sst2 sentence: ok"}, r"d.jsonl:61: no field 'target' \(the target\).*set target_field in \[task\]"),
    ({"text": "sst2 sentence: ok", "target": "positive"}, r"no field 'input' \(the input\).*set input_field"),
    ({"input": "sst2 sentence: ok", "target": " "}, r"d.jsonl:61: the target \(field 'target'\) is empty"),
    ({"input": "sst2 sentence: " + "so " * 200, "target": "positive"},
     r"d.jsonl:61: the input is \d+ tokens, over max_source_length = 128; raise max_source_length"),
    ({"input": "sst2 sentence: ok", "target": "positive " * 20},
     r"d.jsonl:61: the target \+ EOS is \d+ tokens, over max_target_length = 16; raise max_target_length"),
])
def test_bad_lines_are_named_by_file_line_and_option(t5_dir, tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", glue_rows() + [line])
    with pytest.raises(ValueError, match=message):
        make_task("seq2seq", {"model": t5_dir, "data": str(path), "n_val": 5, "n_test": 5})


def test_separate_test_source_with_its_overlap_dropped(t5_dir, data, tmp_path, capsys):
    # the test source is a datasets parquet file with its own field names: 15 new inputs and 5 of the training file's
    import datasets

    rows = glue_rows(start=0, n=60)
    new = [{"sentence": f"sst2 sentence: the {a} {w}", "label_text": "positive" if a in GOOD else "negative"}
           for a in ADJECTIVES[:5] for w in NOUNS[:3]]
    old = [{"sentence": r["input"], "label_text": r["target"]} for r in rows[10:15]]
    datasets.Dataset.from_list(new + old).to_parquet(str(tmp_path / "test.parquet"))
    t = make_task("seq2seq", {"model": t5_dir, "data": str(data), "n_train": 100, "n_val": 8, "n_test": 20,
                              "test_data": f"hf:{tmp_path / 'test.parquet'}", "test_input_field": "sentence",
                              "test_target_field": "label_text", "eval_batch_size": 7, "max_new_tokens": 3})
    assert "dropped 5 training/validation example(s) whose input is in the test source" in capsys.readouterr().err
    assert t.test_overlap_dropped == 5
    text = lambda row: t.tok.decode(row[0])  # noqa: E731
    test = {text(r) for r in t.test_set}
    assert test == {r["sentence"] for r in new + old}
    assert len(t.train_set) + len(t.val_set) == 60 - 5 and not test & {text(r) for r in t.train_set + t.val_set}
    assert sorted(r[2] for r in t.test_set) == sorted(r["label_text"] for r in new + old)  # answer: the target
    built = t.build(seed=0, batch_size=4)
    assert [len(b["answers"]) for b in built.test_batches] == [7, 7, 6]
    out = t.evaluate(built.model, built.test_batches)
    assert len(out["outcomes"]["exact_match"]) == 20 and math.isfinite(out["loss"])


CONFIG = """\
# python -m experiments.ablate {path}
[sweep]
name = "s2s"
task = "seq2seq"
results = "{results}"
seeds = [0]
ranks = [2]
lrs = [1e-2]
steps = 3
batch_size = 4
eval_every = 3
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
"""


def test_seq2seq_through_the_runner(t5_dir, data, tmp_path, capsys):
    from experiments.ablate import main
    from lowrank_ablation.run import read_records

    path = tmp_path / "s2s.toml"
    path.write_text(CONFIG.format(path=path, results=tmp_path / "s2s.jsonl", model=t5_dir, data=data))
    assert main([str(path), "--no-progress"]) == 0
    records = read_records(tmp_path / "s2s.jsonl")
    assert [r["arm"] for r in records] == ["LoRA", "LoRA-GA"]
    for r in records:
        assert r["status"] == "ok" and {"loss", "exact_match"} <= set(r["test"])
        assert math.isfinite(r["test"]["loss"]) and 0 <= r["test"]["exact_match"] <= 1
        assert len(r["loss_curve"]) == 3 and all(math.isfinite(x) for x in r["loss_curve"])
        assert r["test_outcomes"]["exact_match"]["n"] == 6  # per example, for the crossed interval
    assert len({r["test_outcomes"]["exact_match"]["order"] for r in records}) == 1  # one test set, one order
    assert "test exact_match" in capsys.readouterr().out


def test_input_template_and_target_names_pose_glue_as_text(t5_dir, tmp_path):
    """GLUE rows as the hub has them (``sentence``, integer ``label``) become LoRA-GA's text-to-text pairs."""
    rows = [{"sentence": f"film number {i} was {'great' if i % 2 else 'dull'}", "label": i % 2} for i in range(30)]
    path = write_jsonl(tmp_path / "glue.jsonl", rows)
    opts = {"model": t5_dir, "data": str(path), "input_field": "sentence", "target_field": "label", "n_train": 20,
            "n_val": 4, "n_test": 6, "input_template": "classify the sentiment of the text: {input}\nresult: ",
            "target_names": ["negative", "positive"]}
    task = make_task("seq2seq", opts)
    src, tgt, answer = task.test_set[0]
    text = task.tok.decode(src, skip_special_tokens=True)
    assert text.startswith("classify the sentiment of the text: film number") and text.endswith("\nresult: ")
    assert answer == ("positive" if "great" in text else "negative")
    assert task.tok.decode(tgt, skip_special_tokens=True) == answer
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + [{"sentence": "unlabelled", "label": -1}])
    with pytest.raises(ValueError, match=r"label -1 has no word in target_names"):
        make_task("seq2seq", {**opts, "data": str(bad), "n_train": 25})
    with pytest.raises(ValueError, match=r"input_template must be a string with one '\{input\}' field"):
        make_task("seq2seq", {**opts, "input_template": "no field"})
    with pytest.raises(ValueError, match="target_names must be a non-empty list of words"):
        make_task("seq2seq", {**opts, "target_names": []})
