"""``seq2seq``: fine-tuning a T5-style encoder-decoder (``AutoModelForSeq2SeqLM``) on text-to-text pairs, scored
by the loss on the targets and by the exact match of greedily generated targets: LoRA-GA's T5-base on GLUE
(arXiv 2407.05000, after T5's text-to-text GLUE: input ``"sst2 sentence: a gripping film"``, target
``"positive"``).

- The encoder reads ``tok(input)`` (with whatever special tokens the tokenizer adds: T5's appends ``</s>``),
  right-padded, with its ``attention_mask``. The decoder is trained on ``labels`` = ``tok(target,
  add_special_tokens=False)`` + EOS, -100 on padding; the model shifts them right behind its
  ``decoder_start_token_id``, so ``model(**batch).loss`` is the token-weighted mean NLL over the target tokens
  and EOS.
- ``loss``: the same NLL over a whole split, weighted by target tokens. ``exact_match``: ``model.generate``,
  greedy, batched, at most ``max_new_tokens`` (default ``max_target_length``), decoded without special tokens;
  the answer extracted by ``answer_pattern`` (default: the first line) and compared with the reference (the
  ``answer_field``, by default the target itself; ``"a|b"`` lists alternatives) as
  ``lowrank_ablation.answers`` says. ``evaluate`` also returns ``outcomes``: ``{"exact_match": [0/1 per
  example, in batch order]}``, for paired per-example statistics.
- Every batch is a dict in the Hugging Face convention (``input_ids``, ``attention_mask``, ``labels``);
  evaluation batches also carry ``answers`` (the reference strings).
- Data: a ``.jsonl`` file, a ``hf:`` datasets source or a generator (``lowrank_ablation.data.examples``; the input
  plays the prompt, the target the response), split disjoint by input. With ``test_data`` the test split comes
  from that source (its own fields), and training / validation examples whose input is in it are dropped (the
  count is printed and kept as ``test_overlap_dropped``).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..answers import check_compare, compile_pattern, correct
from ._generative import Generative, Splits, quiet_loading
from .base import positive, register_task, restoring_modes

T5_LINEARS = ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]
"""The default targets: every linear layer of T5's blocks, as LoRA-GA's T5 runs adapt them: attention (self and
cross: ``q k v o``) and feed-forward (``wi`` in T5 v1.0's ReLU block, ``wi_0 wi_1`` in the gated block of T5 v1.1
/ Flan-T5 / mT5, ``wo`` in both). A model has one feed-forward kind, so some names match nothing there;
``lowrank`` only refuses a target list that matches no module at all (and this task checks that before any
run). The adapters expose their base layer's ``weight``, which T5's feed-forward reads from ``wo``."""


@register_task("seq2seq")
class Seq2Seq(Generative):
    """A T5-style encoder-decoder fine-tuned on text-to-text pairs (e.g. GLUE as text), scored by generated targets."""

    @dataclass(frozen=True)
    class Options(Splits):
        model: str | None = None
        """A local folder or hub name for ``AutoModelForSeq2SeqLM`` (e.g. ``"t5-base"``); required: no
        encoder-decoder is packaged offline."""
        data: str | None = None
        """A ``.jsonl`` file, a ``datasets`` source ``"hf:<folder | .parquet/.json/.csv file | hub name>"``
        (``data_options``: ``config``, ``split``, ``revision``), or a generator ``"reasoning-gym:<dataset>"``
        (set ``input_field = "question"``, ``target_field = "answer"``)."""
        data_options: dict = field(default_factory=dict)
        input_field: str = "input"
        target_field: str = "target"
        answer_field: str | None = None
        """What a generation is scored against (``"a|b"``: alternatives); default: the target itself."""
        max_source_length: int = 128
        """Longest input in tokens (with the tokenizer's special tokens); a longer example is an error naming it."""
        max_target_length: int = 16
        """Longest target + EOS in tokens; a longer example is an error naming it."""
        max_new_tokens: int | None = None
        """The generation limit; default ``max_target_length``."""
        answer_pattern: str | None = None
        """A regex whose first group is the answer in the generation (default: its first line)."""
        input_template: str | None = None
        """A format for every input with one ``{input}`` field (LoRA-GA's SST-2: ``"classify the sentiment of the
        text: {input}\nresult: "``)."""
        target_names: list[str] | None = None
        """Words for integer labels: a target (and answer) that is an integer ``i`` becomes ``target_names[i]``
        (GLUE SST-2's 0 / 1 as ``["negative", "positive"]``); an integer outside the list is an error naming it."""
        answer_compare: str = "exact"
        """``"exact"`` or ``"math-verify"``, as causal-lm's (``lowrank_ablation.answers``)."""
        test_data: str | None = None
        """A separate test source (as ``data``); default: the test split is carved from ``data``."""
        test_data_options: dict = field(default_factory=dict)
        test_input_field: str | None = None
        test_target_field: str | None = None
        test_answer_field: str | None = None
        """The test source's field names (defaults: ``input_field``, ``target_field``, its own target)."""
        targets: list[str] | str = field(default_factory=lambda: list(T5_LINEARS))
        eval_batch_size: int = 64

        def __post_init__(self):
            from lowrank_ablation.data.examples import check_source, is_generator, is_hf

            positive(self, "n_train", "n_val", "n_test", "init_batches", "max_source_length", "max_target_length",
                     "max_new_tokens", "eval_batch_size")
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("task 'seq2seq' needs model = \"<folder or hub name>\" of an encoder-decoder such as "
                                 "\"t5-base\" or \"google/t5-v1_1-base\" (none is packaged offline), got "
                                 f"{self.model!r}")
            if not isinstance(self.data, str) or not self.data:
                raise ValueError("task 'seq2seq' needs data = \"<file.jsonl>\" or \"hf:<datasets source>\"")
            check_source(self.data)
            for key in ("data_options", "test_data_options"):
                if not isinstance(getattr(self, key), dict):
                    raise ValueError(f"{key} must be a table, got {getattr(self, key)!r}")
            for key in ("input_field", "target_field", "answer_field", "test_input_field", "test_target_field",
                        "test_answer_field"):
                v = getattr(self, key)
                if v is not None and (not isinstance(v, str) or not v):
                    raise ValueError(f"{key} must be a field name, got {v!r}")
            ok = isinstance(self.targets, str) or (isinstance(self.targets, list) and self.targets
                                                   and all(isinstance(t, str) and t for t in self.targets))
            if not ok:
                raise ValueError(f"targets must be a module-name list or one regex, got {self.targets!r}")
            compile_pattern(self.answer_pattern)
            check_compare(self.answer_compare)
            if self.input_template is not None and (not isinstance(self.input_template, str)
                                                    or self.input_template.count("{input}") != 1):
                raise ValueError(f"input_template must be a string with one '{{input}}' field, got "
                                 f"{self.input_template!r}")
            if self.target_names is not None and not (isinstance(self.target_names, list) and self.target_names and all(
                    isinstance(n, str) and n.strip() for n in self.target_names)):
                raise ValueError(f"target_names must be a non-empty list of words, got {self.target_names!r}")
            if self.test_data is not None:
                if not isinstance(self.test_data, str) or not self.test_data:
                    raise ValueError(f"test_data must be a .jsonl file or a 'hf:' source, got {self.test_data!r}")
                check_source(self.test_data)
            elif self.test_data_options or any(getattr(self, k) is not None for k in (
                    "test_input_field", "test_target_field", "test_answer_field")):
                raise ValueError("test_data_options / test_*_field are set but test_data is not: set test_data = "
                                 "\"<file.jsonl>\" or drop them")
            for key, src in (("data_options", self.data), ("test_data_options", self.test_data)):
                if src is not None and getattr(self, key) and not (is_hf(src) or is_generator(src)):
                    raise ValueError(f"{key} = {getattr(self, key)!r} only apply to a 'hf:' source or a generator; "
                                     f"{src!r} is a file: drop {key}")

        @property
        def generation_limit(self) -> int:
            return self.max_new_tokens if self.max_new_tokens is not None else self.max_target_length

    metrics = {"loss": "min", "exact_match": "max"}
    headline = "exact_match"
    units = {"loss": "NLL, nats per target token", "exact_match": "fraction of inputs"}
    example = "text pairs"
    auto_model = "AutoModelForSeq2SeqLM"

    def __init__(self, options):
        from transformers import AutoConfig

        from lowrank_ablation.data.examples import Fields, load_splits, load_test_source

        super().__init__(options)
        o = options
        try:
            config = AutoConfig.from_pretrained(o.model)
        except (OSError, ValueError) as exc:
            raise ValueError(f"model = {o.model!r}: {type(exc).__name__}: {exc}") from None
        if not getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"model = {o.model!r} is a {config.model_type!r}, not an encoder-decoder; task 'seq2seq' "
                             "needs an AutoModelForSeq2SeqLM model (T5, mT5, ...); for a decoder LM use task "
                             "'causal-lm'")
        self.decoder_start_id = getattr(config, "decoder_start_token_id", None)
        if self.decoder_start_id is None:
            raise ValueError(f"model = {o.model!r}: its config has no decoder_start_token_id, so the decoder has no "
                             "first input; set it in config.json (T5 uses its pad token, 0)")
        _check_targets(config, o.targets, o.model)
        self._load_tokenizer(o.model)
        self.pattern = compile_pattern(o.answer_pattern)
        fields = Fields(o.input_field, o.target_field, o.answer_field or o.target_field)
        self.test_overlap_dropped = 0
        with _our_names(""):
            n_test = o.n_test if o.test_data is None else 0
            train, val, test = load_splits(o.data, fields, o.n_train, o.n_val, n_test, o.split_seed, o.data_options)
        if o.test_data is not None:
            target = o.test_target_field or o.target_field
            tf = Fields(o.test_input_field or o.input_field, target, o.test_answer_field or target)
            with _our_names("test_"):
                test, (train, val), self.test_overlap_dropped = load_test_source(
                    o.test_data, tf, o.n_test, o.split_seed, o.test_data_options, exclude=(train, val))
            if self.test_overlap_dropped:
                print(f"seq2seq: dropped {self.test_overlap_dropped} training/validation example(s) whose input is "
                      f"in the test source {o.test_data!r}", file=sys.stderr)
        train, val, test = ([self._named(e) for e in s] for s in (train, val, test))
        self.train_set, self.val_set, self.test_set = ([self._encode(e) for e in s] for s in (train, val, test))

    def _named(self, ex):
        """``ex`` with its integer target / answer as its word (``target_names``)."""
        names = self.options.target_names
        if names is None:
            return ex

        def word(v: str) -> str:
            if not v.strip().lstrip("-").isdigit():
                return v
            i = int(v)
            if not 0 <= i < len(names):
                raise ValueError(f"{ex.where}: label {i} has no word in target_names = {names} (it has {len(names)}); "
                                 "add one, or drop the example (GLUE's unlabelled test rows are -1)")
            return names[i]

        return replace(ex, response=word(ex.response), answer=word(ex.answer))

    # --- tokenization -------------------------------------------------------------------------------------

    def _encode(self, ex) -> tuple[list[int], list[int], str]:
        o = self.options
        text = ex.prompt if o.input_template is None else o.input_template.replace("{input}", ex.prompt)
        src = self.tok(text)["input_ids"]
        tgt = self.tok(ex.response, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        if len(src) > o.max_source_length:
            raise ValueError(f"{ex.where}: the input is {len(src)} tokens, over max_source_length = "
                             f"{o.max_source_length}; raise max_source_length in [task] or shorten or drop the example")
        if len(tgt) > o.max_target_length:
            raise ValueError(f"{ex.where}: the target + EOS is {len(tgt)} tokens, over max_target_length = "
                             f"{o.max_target_length}; raise max_target_length in [task] or shorten or drop the example")
        return src, tgt, ex.answer

    def collate(self, rows: list[tuple[list[int], list[int], str]]) -> dict[str, torch.Tensor]:
        """Right-padded training batch: ``input_ids``, ``attention_mask`` (the inputs), ``labels`` (the targets +
        EOS, -100 on padding)."""
        n_src = max(len(s) for s, _, _ in rows)
        n_tgt = max(len(t) for _, t, _ in rows)
        ids = torch.full((len(rows), n_src), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n_src), dtype=torch.long)
        labels = torch.full((len(rows), n_tgt), -100, dtype=torch.long)
        for i, (s, t, _) in enumerate(rows):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            labels[i, :len(t)] = torch.tensor(t)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_batch(self, rows) -> dict[str, Any]:
        """A training batch plus the reference answers."""
        return {**self.collate(rows), "answers": tuple(a for _, _, a in rows)}

    def generate(self, model, batch: dict[str, Any]) -> list[str]:
        """Greedy targets for the batch's inputs (decoded, special tokens dropped)."""
        from transformers import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=self.options.generation_limit, do_sample=False, num_beams=1,
                               pad_token_id=self.pad_id, eos_token_id=self.tok.eos_token_id,
                               decoder_start_token_id=self.decoder_start_id, use_cache=True)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=cfg)
        return self.tok.batch_decode(out[:, 1:], skip_special_tokens=True)  # out[:, 0]: the decoder start

    def evaluate(self, model, batches, progress: bool = False) -> dict[str, Any]:
        from tqdm.auto import tqdm

        nll, tokens, hits = 0.0, 0, []
        with restoring_modes(model), torch.no_grad():
            bar = tqdm(batches, desc="eval (generate)", disable=not progress, leave=False, unit="batch")
            for b in bar:
                labels = b["labels"]
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).logits
                nll += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                         ignore_index=-100, reduction="sum").item()
                tokens += int((labels != -100).sum())
                texts = self.generate(model, b)
                hits += [int(correct(t, a, self.pattern, self.options.answer_compare))
                         for t, a in zip(texts, b["answers"])]
                bar.set_postfix(exact_match=f"{sum(hits) / len(hits):.3f}")
        return {"loss": nll / tokens, "exact_match": sum(hits) / len(hits), "outcomes": {"exact_match": hits}}

    @classmethod
    def describe(cls, options) -> str:
        model = options.model.rstrip("/").rsplit("/", 1)[-1]
        data = options.data.rsplit("/", 1)[-1]
        return f"{data}, {model}"


def _check_targets(config, targets, model_name: str) -> None:
    """``ValueError`` before any run when ``targets`` match no module of the model."""
    from transformers import AutoModelForSeq2SeqLM

    from lowrank.config import matches_targets

    try:
        with torch.device("meta"), quiet_loading():  # the module tree only: no memory, no weights
            model = AutoModelForSeq2SeqLM.from_config(config)
    except ValueError as exc:  # a config AutoModelForSeq2SeqLM has no class for (e.g. a speech encoder-decoder)
        raise ValueError(f"model = {model_name!r}: {exc}") from None
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: lowrank checks at inject
        return
    modules = dict(model.named_modules())
    hits = [n for n in modules if n and matches_targets(targets, n)]
    if not hits:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"targets {targets!r} match no module of model = {model_name!r} ({type(model).__name__}); "
                         f"its linear layers are named {linear}")


@contextlib.contextmanager
def _our_names(prefix: str):
    """Loader errors in this task's option names: ``lowrank_ablation.data.examples`` speaks of the prompt and the
    response (``prompt_field``); here they are the input and the target (``input_field``, ``test_input_field``)."""
    try:
        yield
    except ValueError as exc:
        msg = str(exc).replace("distinct prompts", "distinct inputs")
        for old, new in (("prompt", "input"), ("response", "target"), ("answer", "answer")):
            msg = (msg.replace(f"(the {old})", f"(the {new})").replace(f"the {old} (field", f"the {new} (field")
                   .replace(f"set {old}_field", f"set {prefix}{new}_field"))
        raise ValueError(msg) from None
