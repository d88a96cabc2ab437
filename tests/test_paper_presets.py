"""The paper's protocols as presets (lowrank_ablation/presets/paper/): each file is run at tiny size on local
stand-ins — a tiny random model from a config and small datasets written here in the real sources' shapes —
with every other key as the file has it, so that every key the preset uses is proven to work. Only the model,
the data locations, the sizes and the device are replaced."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from experiments.ablate import main
from lowrank_ablation import presets
from lowrank_ablation.config import load
from lowrank_ablation.outcomes import decode
from lowrank_ablation.run import read_records

PAPER = Path(presets.__file__).parent / "paper"
PRESETS = ["metamath-gsm8k", "code-humaneval", "t5-glue"]
TINY_SWEEP = {"seeds": "[0]", "steps": "2", "batch_size": "4", "eval_every": "2", "device": '"cpu"'}


def override(text: str, section: str, values: dict[str, str]) -> str:
    """``text`` with ``key = literal`` set in its ``[section]`` (the line replaced, or added after the header)."""
    lines, out, current, seen = text.splitlines(), [], None, set()
    for line in lines:
        header = re.fullmatch(r"\[+([^\]]+)\]+\s*", line)
        if header:
            if current == section:
                out += [f"{k} = {v}" for k, v in values.items() if k not in seen]
            current = header.group(1)
            out.append(line)
            continue
        key = re.match(r"(\w+)\s*=", line)
        if current == section and key and key.group(1) in values:
            seen.add(key.group(1))
            out.append(f"{key.group(1)} = {values[key.group(1)]}")
            continue
        out.append(line)
    if current == section:
        out += [f"{k} = {v}" for k, v in values.items() if k not in seen]
    return "\n".join(out) + "\n"


def tiny_preset(name: str, tmp_path: Path, task: dict[str, str]) -> Path:
    text = (PAPER / f"{name}.toml").read_text()
    text = override(text, "sweep", {**TINY_SWEEP, "results": f'"{tmp_path / "r.jsonl"}"'})
    path = tmp_path / f"{name}.toml"
    path.write_text(override(text, "task", task))
    return path


def _run(path: Path, tmp_path: Path, metric: str) -> list[dict]:
    assert main([str(path), "--no-progress"]) == 0
    records = read_records(tmp_path / "r.jsonl")
    cfg = load(path)
    assert sorted(r["arm"] for r in records) == sorted(a.name for a in cfg.arms)
    for r in records:
        assert r["status"] == "ok" and math.isfinite(r["test"]["loss"]) and 0 <= r["test"][metric] <= 1
        kept = decode(r["test_outcomes"][metric])
        assert sum(kept) / len(kept) == pytest.approx(r["test"][metric])
    return records


@pytest.mark.parametrize("name", PRESETS)
def test_presets_keep_the_papers_settings(name, tmp_path):
    import torch

    if not torch.cuda.is_available():  # as shipped, a preset asks for a GPU and says so on a machine without one
        with pytest.raises(ValueError, match="device = 'cuda' but no CUDA device is available"):
            load(PAPER / f"{name}.toml")
    path = tmp_path / f"{name}.toml"
    text = override((PAPER / f"{name}.toml").read_text(), "sweep", {"device": '"cpu"'})
    path.write_text(text.replace(f"lowrank_ablation/presets/paper/{name}.toml", str(path), 1))
    cfg = load(path)
    s = cfg.sweep
    assert s.seeds == [0, 1, 2] and s.ranks == [8] and s.alpha == 16 and s.batch_size == 32
    ga = next(a for a in cfg.arms if a.name == "LoRA-GA")
    assert ga.init == "lora_ga" and ga.scaling == "rslora" and ga.init_options["stable_gamma"] == 16.0
    if name == "t5-glue":
        assert s.lrs == [1e-4] and s.dtype == "float32" and cfg.task["max_source_length"] == 128
    else:
        assert s.lrs == [2e-5] and s.dtype == "bfloat16" and (s.schedule, s.warmup_ratio) == ("cosine", 0.03)
        assert s.max_grad_norm == 1.0 and s.weight_decay == 0.0 and s.steps * s.batch_size == 100_000
        assert cfg.task["model"] == "meta-llama/Llama-2-7b-hf" and cfg.task["max_new_tokens"] == 512
    assert "MT-bench" in (PAPER / "README.md").read_text()  # the third LLM protocol: left out, and said so


def test_metamath_gsm8k_at_tiny_size(tmp_path, tiny_lm_dir):
    import datasets

    # MetaMathQA's shape: query / response (a worked solution ending '#### N\nThe answer is: N') / type; two
    # MATH rows the preset's where filter must leave out
    rows = [{"query": f"What is {a} plus {a + 3}?", "response": f"{a} + {a + 3} = {2 * a + 3}\n#### {2 * a + 3}\n"
             f"The answer is: {2 * a + 3}", "type": "GSM_AnsAug" if a % 2 else "GSM_Rephrased"} for a in range(40)]
    rows += [{"query": f"Solve x^2 = {a * a}", "response": f"The answer is: {a}", "type": "MATH_AnsAug"}
             for a in range(2)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "metamath"))
    datasets.Dataset.from_dict({"question": [f"What is {a} times 2?" for a in range(6)],
                                "answer": [f"{a} * 2 = {2 * a}\n#### {2 * a}" for a in range(6)]}
                               ).to_parquet(str(tmp_path / "gsm8k.parquet"))
    path = tiny_preset("metamath-gsm8k", tmp_path, {
        "model": f'"{tiny_lm_dir}"', "data": f'"hf:{tmp_path / "metamath"}"', "test_data": f'"hf:{tmp_path / "gsm8k.parquet"}"',
        "n_train": "30", "n_val": "4", "n_test": "6", "max_new_tokens": "8", "eval_batch_size": "4"})
    _run(path, tmp_path, "exact_match")
    from lowrank_ablation import make_task

    task = make_task("causal-lm", load(path).task)  # what the keys did to the data
    assert sorted(int(a) for _, _, a in task.test_set) == [2 * a for a in range(6)]  # '#### N' reduced to N
    assert all(a.isdigit() for _, _, a in task.val_set)  # the worked solutions' final answers
    assert len(task.train_set) + len(task.val_set) == 34  # the MATH rows filtered out
    assert task.tok.decode(task.test_set[0][0], skip_special_tokens=True).startswith("Q: What is")


def test_code_humaneval_at_tiny_size(tmp_path, tiny_lm_dir):
    import datasets

    pairs = [{"query": f"Write a function that returns {k}.", "answer": f"```python\ndef f():\n    return {k}\n```"}
             for k in range(30)]
    datasets.Dataset.from_list(pairs).to_json(str(tmp_path / "codefeedback.jsonl"))
    path = tiny_preset("code-humaneval", tmp_path, {
        "model": f'"{tiny_lm_dir}"', "data": f'"hf:{tmp_path / "codefeedback.jsonl"}"', "n_train": "24",
        "n_val": "4", "n_test": "2", "max_new_tokens": "16", "eval_batch_size": "2"})
    records = _run(path, tmp_path, "pass_at_1")  # HumanEval's real first problems, run by its harness
    assert all(r["test_outcomes"]["pass_at_1"]["n"] == 2 for r in records)


def test_t5_glue_at_tiny_size(tmp_path, tiny_lm_dir):
    import datasets
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    # GLUE SST-2's shape: sentence / integer label, train and validation splits in one folder
    split = lambda n, s: datasets.Dataset.from_dict({  # noqa: E731
        "sentence": [f"{s} film number {i} was {'great' if i % 2 else 'dull'}" for i in range(n)],
        "label": [i % 2 for i in range(n)], "idx": list(range(n))})
    datasets.DatasetDict({"train": split(30, "a"), "validation": split(6, "the")}).save_to_disk(str(tmp_path / "glue"))
    path = tiny_preset("t5-glue", tmp_path, {
        "model": f'"{tmp_path / "t5"}"', "data": f'"hf:{tmp_path / "glue"}"', "test_data": f'"hf:{tmp_path / "glue"}"',
        "n_train": "24", "n_val": "4", "n_test": "6"})
    _run(path, tmp_path, "exact_match")
