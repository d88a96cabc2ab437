"""WordNet supersense classification: real labelled text available offline.

Each WordNet 3.0 synset carries its lexicographer file (its *supersense*, e.g. ``noun.animal``,
``verb.motion``) and a gloss. The task: classify the definition (the gloss before its quoted
examples) into the supersense. Nouns and verbs give 95,882 examples in 41 classes.
Data: Debian package ``wordnet-base`` (``apt-get install -y wordnet-base``), installed by
``scripts/setup.sh``.
"""

from __future__ import annotations

import os
from pathlib import Path

# man 5 lexnames: file number -> name, fixed in WordNet 3.0 (the package ships no lexnames file).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
assert len(LEXNAMES) == 45

DEFAULT_ROOT = Path(os.environ.get("WORDNET_ROOT", "/usr/share/wordnet"))


def read_synsets(pos: str, root: Path = DEFAULT_ROOT) -> list[tuple[str, int]]:
    """``[(definition, lexicographer file number)]`` from ``data.<pos>``."""
    path = Path(root) / f"data.{pos}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install WordNet with `apt-get install -y wordnet-base` "
                                f"(scripts/setup.sh does it) or set WORDNET_ROOT")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            head, _, gloss = line.partition(" | ")
            lexfile = int(head.split(" ", 2)[1])
            definition = gloss.split(";", 1)[0].strip().strip('"').strip()
            if definition:
                out.append((definition, lexfile))
    return out


def load_supersense(pos: tuple[str, ...] = ("noun", "verb"), root: Path = DEFAULT_ROOT):
    """A ``datasets.Dataset`` with ``text`` and ``label`` (a ``ClassLabel`` of supersense names)."""
    import datasets

    rows = [r for p in pos for r in read_synsets(p, root)]
    used = sorted({lex for _, lex in rows})
    index = {lex: i for i, lex in enumerate(used)}
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=[LEXNAMES[lex] for lex in used])})
    return datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [index[lex] for _, lex in rows]},
                                      features=features)


def supersense_splits(n_train: int | None = None, n_eval: int = 1000, seed: int = 0, **kw):
    """A fixed, stratified ``(train, held-out)`` split; ``n_train`` subsamples the train part (stratified too)."""
    train, _, test = supersense_train_val_test(n_train=n_train, n_val=0, n_test=n_eval, seed=seed, **kw)
    return train, test


def supersense_train_val_test(n_train: int | None = None, n_val: int = 500, n_test: int = 1000, seed: int = 0, **kw):
    """Fixed, stratified, disjoint ``(train, validation, test)`` splits.

    The test part is carved first (so it is the same set as ``supersense_splits``' held-out part
    for the same ``n_test`` and ``seed``), then validation from the rest; ``n_train`` subsamples
    what remains. Select hyper-parameters on validation, report on test.
    """
    from sklearn.model_selection import train_test_split  # fast stratified index splits

    ds = load_supersense(**kw)
    labels = ds["label"]
    rest, test_idx = train_test_split(range(len(ds)), test_size=n_test, stratify=labels, random_state=seed)
    val_idx: list[int] = []
    if n_val:
        rest, val_idx = train_test_split(rest, test_size=n_val, stratify=[labels[i] for i in rest], random_state=seed)
    if n_train is not None and n_train < len(rest):
        rest, _ = train_test_split(rest, train_size=n_train, stratify=[labels[i] for i in rest], random_state=seed)
    return ds.select(rest), ds.select(val_idx), ds.select(test_idx)
