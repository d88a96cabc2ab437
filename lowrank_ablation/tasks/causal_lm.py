"""``causal-lm``: supervised fine-tuning of a decoder LM on prompt/response pairs, scored by the loss on the
responses and by the exact match of greedily generated answers (the field's protocol: MetaMathQA ->
GSM8K in LoRA-GA, arXiv 2407.05000; here by default the offline SmolLM2-135M on reasoning-gym problems).

- A training sequence is ``tok(prompt)`` + ``tok(response, add_special_tokens=False)`` + EOS; labels are
  -100 on the prompt and on padding, so ``model(**batch).loss`` is the token-weighted mean NLL over the
  response tokens and EOS (``chat_template = true`` wraps the prompt in the tokenizer's chat template
  first, as one user turn with the generation prompt).
- ``loss``: the same NLL over a whole split, weighted by tokens. ``exact_match``: ``model.generate``,
  greedy, batched and left-padded with the KV cache, at most ``max_new_tokens``; the answer extracted by
  ``answer_pattern`` (default: the first line) and compared as ``lowrank_ablation.answers`` says
  (``answer_compare``: normalized strings, or math-verify). ``evaluate`` also returns each example's
  outcome (``outcomes``), which the runner keeps for the per-example paired interval.
- Every batch is a dict in the Hugging Face convention (``input_ids``, ``attention_mask``, ``labels``);
  evaluation batches also carry ``prompt_ids`` / ``prompt_mask`` (left-padded) and ``answers``.
- Data: a ``.jsonl`` file, a ``hf:`` datasets source or a generator (``lowrank_ablation.data.examples``); splits
  disjoint by prompt. With
  ``test_data`` the test split comes from that source (its own fields, answer pattern and generator options),
  as the paper trains on MetaMathQA and tests on GSM8K; training and validation are carved from ``data``, and
  any of their examples whose prompt is in the test split is dropped (the count is printed and kept as
  ``test_overlap_dropped``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..answers import check_compare, compile_pattern, correct, extract
from ._generative import Generative, Splits
from .base import positive, register_task, restoring_modes

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@register_task("causal-lm")
class CausalLM(Generative):
    """A decoder LM fine-tuned on prompt/response pairs (jsonl or reasoning-gym), scored by generated answers."""

    @dataclass(frozen=True)
    class Options(Splits):
        data: str | None = None
        """A ``.jsonl`` file, a ``datasets`` source ``"hf:<folder | .parquet/.json/.csv file | hub name>"``
        (``data_options``: ``config``, ``split``, ``revision``), or a generator: ``"reasoning-gym:<dataset>"``."""
        model: str = "smollm2-135m"
        """A local folder or hub name for ``AutoModelForCausalLM``; ``"smollm2-135m"`` is the offline package."""
        data_options: dict = field(default_factory=dict)
        """Keyword options of the generator (e.g. ``{ min_terms = 2, max_digits = 2 }`` for chain_sum)."""
        prompt_field: str | None = None
        """Default ``"prompt"`` (jsonl) or ``"question"`` (reasoning-gym)."""
        response_field: str | None = None
        """Default ``"response"`` (jsonl) or ``"answer"`` (reasoning-gym; set ``"answer_cot"`` to train on
        gsm_symbolic's worked solutions, with ``answer_pattern = '#### (\\S+)'``)."""
        answer_field: str | None = None
        """Default ``"answer"``."""
        max_length: int = 128
        """Longest prompt + response + EOS in tokens; a longer example is an error naming it."""
        max_new_tokens: int = 16
        answer_pattern: str | None = None
        """A regex whose first group is the answer in the generation (default: its first line). A reference answer
        it matches is reduced to its match too (``answer_field = "response"`` with MetaMathQA's worked solutions)."""
        answer_compare: str = "exact"
        """How an extracted answer is compared with the reference: ``"exact"`` (normalized strings, numbers as
        numbers) or ``"math-verify"`` (parsed and compared as mathematics; without ``answer_pattern`` the
        verifier extracts the final answer itself): ``lowrank_ablation.answers``."""
        chat_template: bool = False
        prompt_template: str | None = None
        """A format for every prompt (training and test) with one ``{prompt}`` field, applied before any chat
        template: LoRA-GA's MetaMathQA / GSM8K runs use ``"Q: {prompt}\nA: "``."""
        drop_long: bool = False
        """Drop training / validation examples longer than ``max_length`` (counted, printed, kept as
        ``dropped_long``) instead of refusing them, as LoRA-GA's data code filters MetaMathQA; a test example
        that long is still an error (a test set is not filtered silently)."""
        test_data: str | None = None
        """A separate test source (``.jsonl`` or a generator); default: the test split is carved from ``data``."""
        test_data_options: dict = field(default_factory=dict)
        """The test generator's options (as ``data_options``)."""
        test_prompt_field: str | None = None
        test_response_field: str | None = None
        test_answer_field: str | None = None
        """The test source's field names (defaults as for ``data``, by its kind)."""
        test_answer_pattern: str | None = None
        """The answer pattern on test generations (default: ``answer_pattern``); a test reference answer it
        matches is reduced to its match too (GSM8K's ``answer`` field is a worked solution ending ``#### N``)."""
        targets: list[str] | str = field(default_factory=lambda: list(PROJECTIONS))
        eval_batch_size: int = 64

        def __post_init__(self):
            from lowrank_ablation.data.examples import check_source

            positive(self, "n_train", "n_val", "n_test", "init_batches", "max_length", "max_new_tokens",
                     "eval_batch_size")
            if not isinstance(self.data, str) or not self.data:
                raise ValueError("task 'causal-lm' needs data = \"<file.jsonl>\" or \"reasoning-gym:<dataset>\"")
            check_source(self.data)
            if not isinstance(self.data_options, dict):
                raise ValueError(f"data_options must be a table, got {self.data_options!r}")
            if not isinstance(self.model, str) or not self.model:
                raise ValueError(f"model must be a local path or hub name, got {self.model!r}")
            ok = isinstance(self.targets, str) or (isinstance(self.targets, list) and self.targets
                                                   and all(isinstance(t, str) for t in self.targets))
            if not ok:
                raise ValueError(f"targets must be a module-name list or one regex, got {self.targets!r}")
            compile_pattern(self.answer_pattern)
            compile_pattern(self.test_answer_pattern)
            check_compare(self.answer_compare)
            if self.prompt_template is not None and (not isinstance(self.prompt_template, str)
                                                     or self.prompt_template.count("{prompt}") != 1):
                raise ValueError(f"prompt_template must be a string with one '{{prompt}}' field, got "
                                 f"{self.prompt_template!r}")
            if self.test_data is not None:
                if not isinstance(self.test_data, str) or not self.test_data:
                    raise ValueError(f"test_data must be a .jsonl file, a 'hf:' source or a generator, got "
                                     f"{self.test_data!r}")
                check_source(self.test_data)
            elif self.test_data_options or any(getattr(self, k) is not None for k in (
                    "test_prompt_field", "test_response_field", "test_answer_field", "test_answer_pattern")):
                raise ValueError("test_data_options / test_*_field / test_answer_pattern are set but test_data is "
                                 "not: set test_data = \"<file.jsonl>\" or drop them")
            if not isinstance(self.test_data_options, dict):
                raise ValueError(f"test_data_options must be a table, got {self.test_data_options!r}")

    metrics = {"loss": "min", "exact_match": "max"}
    headline = "exact_match"
    units = {"loss": "NLL, nats per response token", "exact_match": "fraction of prompts"}
    example = "sequences"
    auto_model = "AutoModelForCausalLM"

    def __init__(self, options):
        from lowrank_ablation.data.examples import Fields, default_fields, load_splits, load_test_source

        super().__init__(options)
        o = options
        self._load_tokenizer(_model_path(o.model))
        self.pattern = compile_pattern(o.answer_pattern)
        d = default_fields(o.data)
        fields = Fields(o.prompt_field or d.prompt, o.response_field or d.response, o.answer_field or d.answer)
        self.test_pattern = self.pattern
        self.test_overlap_dropped = 0
        if o.test_data is None:
            splits = load_splits(o.data, fields, o.n_train, o.n_val, o.n_test, o.split_seed, o.data_options)
        else:
            train, val, _ = load_splits(o.data, fields, o.n_train, o.n_val, 0, o.split_seed, o.data_options)
            t = default_fields(o.test_data)
            tf = Fields(o.test_prompt_field or t.prompt, o.test_response_field or t.response,
                        o.test_answer_field or t.answer)
            test, (train, val), self.test_overlap_dropped = load_test_source(
                o.test_data, tf, o.n_test, o.split_seed, o.test_data_options, exclude=(train, val))
            if self.test_overlap_dropped:
                print(f"causal-lm: dropped {self.test_overlap_dropped} training/validation example(s) whose prompt "
                      f"is in the test source {o.test_data!r}", file=sys.stderr)
            if o.test_answer_pattern is not None:
                self.test_pattern = compile_pattern(o.test_answer_pattern)
            splits = (train, val, test)
        if self.pattern is not None or self.test_pattern is not None:  # worked solutions reduced to their answers
            splits = tuple([_reference(e, p) for e in split]
                           for split, p in zip(splits, (self.pattern, self.pattern, self.test_pattern)))
        self.dropped_long = 0
        self.train_set, self.val_set = (self._encode_all(s) for s in splits[:2])
        self.test_set = [self._encode(e) for e in splits[2]]
        if self.dropped_long:
            print(f"causal-lm: dropped {self.dropped_long} training/validation example(s) over max_length = "
                  f"{o.max_length} tokens (drop_long = true)", file=sys.stderr)

    def _encode_all(self, examples) -> list[tuple[list[int], list[int], str]]:
        out = []
        for e in examples:
            try:
                out.append(self._encode(e))
            except _TooLong:
                if not self.options.drop_long:
                    raise
                self.dropped_long += 1
        return out

    # --- tokenization -------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.options.prompt_template is not None:
            prompt = self.options.prompt_template.replace("{prompt}", prompt)
        if self.options.chat_template:
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(prompt)["input_ids"]

    def _encode(self, ex) -> tuple[list[int], list[int], str]:
        p = self.prompt_ids(ex.prompt)
        r = self.tok(ex.response, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        if len(p) + len(r) > self.options.max_length:
            raise _TooLong(f"{ex.where}: prompt + response + EOS is {len(p) + len(r)} tokens ({len(p)} in the "
                           f"prompt), over max_length = {self.options.max_length}; raise max_length in [task], "
                           "shorten or drop the example, or set drop_long = true (training and validation only)")
        return p, r, ex.answer

    def collate(self, rows: list[tuple[list[int], list[int], str]]) -> dict[str, torch.Tensor]:
        """Right-padded training batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 off the response)."""
        length = max(len(p) + len(r) for p, r, _ in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (p, r, _) in enumerate(rows):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            mask[i, :n] = 1
            labels[i, len(p):n] = torch.tensor(r)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_batch(self, rows) -> dict[str, Any]:
        """A training batch plus the left-padded prompts to generate from and the reference answers."""
        b = self.collate(rows)
        length = max(len(p) for p, _, _ in rows)
        pids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        pmask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (p, _, _) in enumerate(rows):
            pids[i, length - len(p):] = torch.tensor(p)
            pmask[i, length - len(p):] = 1
        return {**b, "prompt_ids": pids, "prompt_mask": pmask, "answers": tuple(a for _, _, a in rows)}

    def _test_batches(self) -> list[dict[str, Any]]:
        batches = self._eval_batches(self.test_set)
        if self.test_pattern is not self.pattern:
            for b in batches:
                b["answer_pattern"] = self.test_pattern  # the test source's rule for its own generations
        return batches

    def generate(self, model, batch: dict[str, Any]) -> list[str]:
        """Greedy completions of the batch's prompts (decoded, special tokens dropped)."""
        from transformers import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=self.options.max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=self.pad_id, eos_token_id=self.tok.eos_token_id, use_cache=True)
        out = model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], generation_config=cfg)
        return self.tok.batch_decode(out[:, batch["prompt_ids"].shape[1]:], skip_special_tokens=True)

    def evaluate(self, model, batches, progress: bool = False) -> dict[str, float]:
        from tqdm.auto import tqdm

        nll, tokens, outcomes = 0.0, 0, []
        with restoring_modes(model), torch.no_grad():
            bar = tqdm(batches, desc="eval (generate)", disable=not progress, leave=False, unit="batch")
            for b in bar:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                k = int((b["labels"][:, 1:] != -100).sum())
                nll += out.loss.float().item() * k
                tokens += k
                texts = self.generate(model, b)
                pattern = b.get("answer_pattern", self.pattern)
                outcomes += [int(correct(t, a, pattern, self.options.answer_compare))
                             for t, a in zip(texts, b["answers"])]
                bar.set_postfix(exact_match=f"{sum(outcomes) / len(outcomes):.3f}")
        return {"loss": nll / tokens, "exact_match": sum(outcomes) / len(outcomes),
                "outcomes": {"exact_match": outcomes}}

    @classmethod
    def describe(cls, options) -> str:
        from lowrank_ablation.data import smollm2

        model = smollm2.LABEL if options.model == smollm2.NAME else options.model.rstrip("/").rsplit("/", 1)[-1]
        data = options.data.rsplit("/", 1)[-1]
        return f"{data}, {model}"


class _TooLong(ValueError):
    """An example longer than ``max_length`` (dropped under ``drop_long``)."""


def _reference(ex, pattern):
    """``ex`` with its answer reduced to what ``pattern`` extracts from it, when it matches (unchanged without
    a pattern)."""
    got = None if pattern is None else extract(ex.answer, pattern)
    return ex if got is None else replace(ex, answer=got)


def _model_path(model: str) -> str:
    from lowrank_ablation.data import smollm2

    return smollm2.smollm2_path() if model == smollm2.NAME else model
