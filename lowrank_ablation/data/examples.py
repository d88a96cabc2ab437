"""Prompt / response / answer examples for supervised fine-tuning of a decoder LM, from a ``.jsonl`` file or
a named generator, split into disjoint train / validation / test sets.

- A ``.jsonl`` file: one JSON object per line with a prompt, a response (the text trained on) and an
  answer (what a generation is scored against; ``"a|b"`` lists alternatives). Field names are options.
  Lines whose prompt repeats an earlier line's are dropped (and counted), then a seeded shuffle carves
  test first, validation next, and train from the rest, so no prompt is in two splits.
- ``reasoning-gym:NAME``: ``reasoning_gym.create_dataset(NAME, seed=..., **options)``, problems without end.
  Item ``i`` of seed ``s`` is generated from ``Random(s + i)``, so seeds ``s`` and ``s + 1`` give the same
  problems shifted by one: each split draws from its own seed block (``STRIDE`` apart), test first, and
  keeps only prompts not seen before in any split. Fields are the item's ``question`` and ``answer`` and its
  ``metadata`` keys (``answer_cot`` for ``gsm_symbolic``).

- ``hf:SOURCE``: a Hugging Face ``datasets`` source, read whole and then treated as a file. ``SOURCE`` is a
  folder written by ``Dataset.save_to_disk`` (``load_from_disk``), a ``.parquet`` / ``.json`` / ``.jsonl`` /
  ``.csv`` file (``load_dataset(<format>, data_files=...)``), or a hub name (``load_dataset(SOURCE)``, which needs
  the network or the local cache); ``data_options`` may give ``config``, ``split`` (default ``"train"``),
  ``revision`` and ``where``, a table of field -> shell-style pattern that keeps only the rows whose fields all
  match (``where = { type = "GSM_*" }``: MetaMathQA's GSM8K-derived rows, as LoRA-GA trains on). ``openai/gsm8k`` (config ``main``: ``question`` / ``answer`` ending ``#### N``) and
  ``meta-math/MetaMathQA`` (``query`` / ``response``) are read by naming their fields.

Every example records where it came from (``file:line`` or ``generator #index``) for error messages.
"""

from __future__ import annotations

import fnmatch
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

GENERATORS = ("reasoning-gym",)
STRIDE = 1_000_000_007
"""Distance between the seed blocks of the three splits of a generator (item i of seed s uses s + i)."""
MAX_DRAWS = 50
"""A generator may draw at most this many items per example asked for before giving up."""


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    answer: str
    where: str
    """``path:line`` or ``reasoning-gym:NAME seed S #i``."""


@dataclass(frozen=True)
class Fields:
    prompt: str
    response: str
    answer: str


def default_fields(data: str) -> Fields:
    if is_generator(data):
        return Fields("question", "answer", "answer")
    return Fields("prompt", "response", "answer")


HF_OPTIONS = ("config", "split", "revision", "where")
HF_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def is_hf(data: str) -> bool:
    return data.startswith("hf:")


def read_hf(data: str, fields: Fields, options: dict[str, Any] | None = None) -> list[Example]:
    """Every row of a ``datasets`` source (module docstring) as an :class:`Example`; errors name the row."""
    import datasets

    opts = dict(options or {})
    unknown = sorted(set(opts) - set(HF_OPTIONS))
    if unknown:
        raise ValueError(f"data = {data!r}: unknown option(s) {unknown}; a datasets source takes {list(HF_OPTIONS)}")
    src, split = data[3:], opts.get("split", "train")
    path = Path(src)
    try:
        saved = ("dataset_info.json", "state.json", "dataset_dict.json")
        if path.is_dir() and any((path / name).exists() for name in saved):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.suffix in HF_FORMATS:
            if not path.is_file():
                raise ValueError(f"data = {data!r}: no such file")
            ds = datasets.load_dataset(HF_FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(src, opts.get("config"), split=split, revision=opts.get("revision"))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the hub, the cache, a bad config: say which source, in its words
        raise ValueError(f"data = {data!r} {opts}: {type(exc).__name__}: {exc}") from None
    where = opts.get("where") or {}
    if not isinstance(where, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in where.items()):
        raise ValueError(f"data = {data!r}: where must be a table of field = \"pattern\", got {where!r}")
    missing = sorted(set(where) - set(ds.column_names))
    if missing:
        raise ValueError(f"data = {data!r}: where names field(s) {missing}; its fields are {ds.column_names}")
    out = [_example(row, fields, f"{data} row {i}") for i, row in enumerate(ds)
           if all(fnmatch.fnmatchcase(str(row[k]), v) for k, v in where.items())]
    if not out:
        raise ValueError(f"data = {data!r} has no rows" + (f" matching where = {where}" if where else ""))
    return out


def read_rows(data: str, fields: Fields, options: dict[str, Any] | None = None) -> list[Example]:
    """A file-like source's examples: a ``.jsonl`` file or a ``hf:`` source (``options`` only for the latter)."""
    if is_hf(data):
        return read_hf(data, fields, options)
    if options:
        raise ValueError(f"data_options {options} only apply to a generator or a hf: source; data = {data!r} is a file")
    return read_jsonl(data, fields)


def is_generator(data: str) -> bool:
    return data.split(":", 1)[0] in GENERATORS and ":" in data


def check_source(data: str) -> None:
    """``ValueError`` unless ``data`` names a ``.jsonl`` file or ``reasoning-gym:<name>`` (checked before any loading)."""
    if is_generator(data):
        if not data.split(":", 1)[1]:
            raise ValueError(f"data = {data!r} names no dataset; e.g. 'reasoning-gym:chain_sum'")
        return
    if is_hf(data):
        if not data[3:]:
            raise ValueError(f"data = {data!r} names no source; e.g. 'hf:openai/gsm8k' or 'hf:data/train.parquet'")
        return
    if not data.endswith(".jsonl"):
        raise ValueError(f"data = {data!r} must be a .jsonl file, a 'hf:' datasets source or a generator such as "
                         f"'reasoning-gym:chain_sum' (generators: {list(GENERATORS)})")


def _example(row: dict[str, Any], fields: Fields, where: str) -> Example:
    values = []
    for role in ("prompt", "response", "answer"):
        key = getattr(fields, role)
        if key not in row:
            raise ValueError(f"{where}: no field {key!r} (the {role}); the line has {sorted(row)}; "
                             f"set {role}_field in [task] to one of them")
        v = row[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise ValueError(f"{where}: field {key!r} (the {role}) must be a string, got {type(v).__name__}")
        if role != "answer" and not v.strip():
            raise ValueError(f"{where}: the {role} (field {key!r}) is empty; remove the line or fill it in")
        values.append(v)
    return Example(*values, where=where)


def read_jsonl(path: str, fields: Fields) -> list[Example]:
    """Every line of ``path`` as an :class:`Example` (blank lines skipped); errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data = {path!r}: no such file")
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg}); every line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object with fields {list(vars(fields).values())}, "
                                 f"got {type(row).__name__}")
            out.append(_example(row, fields, f"{path}:{i}"))
    if not out:
        raise ValueError(f"data = {path!r} has no examples")
    return out


def _split_file(path: str, fields: Fields, n: tuple[int, int, int], seed: int, options=None):
    rows = read_rows(path, fields, options)
    seen: set[str] = set()
    unique = []
    for ex in rows:
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            unique.append(ex)
    if len(unique) < len(rows):
        print(f"{path}: dropped {len(rows) - len(unique)} line(s) whose prompt repeats an earlier line's",
              file=sys.stderr)
    n_train, n_val, n_test = n
    if len(unique) < n_val + n_test + 1:
        raise ValueError(f"data = {path!r} has {len(unique)} distinct prompts; n_val + n_test = {n_val + n_test} "
                         "leaves none to train on: lower n_val / n_test or add examples")
    random.Random(seed).shuffle(unique)
    test, val, rest = unique[:n_test], unique[n_test:n_test + n_val], unique[n_test + n_val:]
    return rest[:n_train], val, test


def _items(name: str, seed: int, options: dict[str, Any], size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    except Exception as exc:  # noqa: BLE001 - an unknown name or option: say which, with its own words
        raise ValueError(f"data = 'reasoning-gym:{name}' with data_options {options}: {type(exc).__name__}: {exc}") \
            from None
    for i in range(size):
        item = ds[i]
        row = {k: v for k, v in (item.get("metadata") or {}).items() if isinstance(v, (str, int, float))}
        row.update(question=item["question"], answer=item["answer"])
        yield i, row


def _split_generator(data: str, fields: Fields, n: tuple[int, int, int], seed: int, options: dict[str, Any]):
    name = data.split(":", 1)[1]
    seen: set[str] = set()
    splits = []
    for block, count in ((0, n[2]), (1, n[1]), (2, n[0])):  # test, validation, train
        s = seed * 3 * STRIDE + block * STRIDE
        got: list[Example] = []
        if count == 0:
            splits.append(got)
            continue
        for i, row in _items(name, s, options, MAX_DRAWS * count + 100):
            ex = _example(row, fields, f"{data} seed {s} #{i}")
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                got.append(ex)
                if len(got) == count:
                    break
        if len(got) < count:
            raise ValueError(f"data = {data!r} with data_options {options} gave only {len(got)} new distinct prompts "
                             f"for a split of {count} ({len(seen)} in all): ask for fewer examples or widen the "
                             "generator's options")
        splits.append(got)
    test, val, train = splits
    return train, val, test


def load_splits(data: str, fields: Fields, n_train: int, n_val: int, n_test: int, seed: int,
                options: dict[str, Any] | None = None) -> tuple[list[Example], list[Example], list[Example]]:
    """``(train, validation, test)``: disjoint by prompt (checked), at most ``n_train`` / exactly ``n_val`` /
    ``n_test`` examples."""
    check_source(data)
    n = (n_train, n_val, n_test)
    if is_generator(data):
        train, val, test = _split_generator(data, fields, n, seed, dict(options or {}))
    else:
        train, val, test = _split_file(data, fields, n, seed, options)
    prompts = [{e.prompt for e in s} for s in (train, val, test)]
    if prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2]:
        raise AssertionError("a prompt is in two splits")  # cannot happen by construction: the check guards it
    return train, val, test


def load_test_source(data: str, fields: Fields, n_test: int, seed: int, options: dict[str, Any] | None = None,
                     exclude: tuple[list[Example], ...] = ()) -> tuple[list[Example], tuple[list[Example], ...], int]:
    """A test split from its own source (``test_data``): ``n_test`` distinct prompts (a file's, shuffled by
    ``seed``; a generator's, drawn from its test block), and the ``exclude`` splits with every example whose
    prompt is in the test split removed. Returns ``(test, cleaned splits, number removed)``."""
    check_source(data)
    if is_generator(data):
        test = _split_generator(data, fields, (0, 0, n_test), seed, dict(options or {}))[2]
    else:
        seen: set[str] = set()
        unique = [ex for ex in read_rows(data, fields, options) if not (ex.prompt in seen or seen.add(ex.prompt))]
        if len(unique) < n_test:
            raise ValueError(f"test_data = {data!r} has {len(unique)} distinct prompts, fewer than n_test = {n_test}; "
                             "lower n_test or add examples")
        random.Random(seed).shuffle(unique)
        test = unique[:n_test]
    prompts = {e.prompt for e in test}
    cleaned = tuple([e for e in split if e.prompt not in prompts] for split in exclude)
    return test, cleaned, sum(len(a) - len(b) for a, b in zip(exclude, cleaned))
