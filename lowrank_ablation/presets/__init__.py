"""The sweep configs that ship with lowrank (package data), by name: ``demo``, ``lm-ablation``,
``paper/metamath-gsm8k``, ... A name is the file's path under this folder without ``.toml``.

    lowrank presets                      # names and first comment lines
    lowrank copy demo mine.toml          # a copy to edit; its first line and results path name the copy
    lowrank ablate demo                  # a preset runs by name; a path runs that file

Each preset's results path is relative to the directory the command runs in (``experiments/results/...`` for
the ones whose results the repository commits), so running one from a checkout's root resumes those results.
"""

from __future__ import annotations

import atexit
import contextlib
import re
from importlib import resources
from pathlib import Path

_FILES = contextlib.ExitStack()
atexit.register(_FILES.close)
_RESULTS = re.compile(r'^results\s*=\s*"[^"\n]*"', re.MULTILINE)


def _root():
    return resources.files(__name__)


def names() -> list[str]:
    """Every bundled preset's name, sorted (``paper/...`` for the paper's protocols)."""
    found = []

    def walk(folder, prefix: str) -> None:
        for item in folder.iterdir():
            if item.is_dir() and not item.name.startswith("_"):
                walk(item, f"{prefix}{item.name}/")
            elif item.name.endswith(".toml"):
                found.append(prefix + item.name[: -len(".toml")])

    walk(_root(), "")
    return sorted(found)


def _name(name: str) -> str:
    return name[: -len(".toml")] if name.endswith(".toml") else name


def text(name: str) -> str:
    """The preset's TOML text (``name`` with or without ``.toml``); ``ValueError`` listing the presets for an
    unknown name."""
    name = _name(name)
    known = names()
    if name not in known:
        raise ValueError(f"no preset named {name!r}; the bundled presets are {known} (lowrank presets lists them; "
                         "a path to a .toml file runs that file)")
    return _root().joinpath(*f"{name}.toml".split("/")).read_text()


def path(name: str) -> Path:
    """A filesystem path to the preset (the installed package's file; ``ValueError`` for an unknown name)."""
    text(name)
    resource = _root().joinpath(*f"{_name(name)}.toml".split("/"))
    if isinstance(resource, Path):  # an ordinary install or a checkout
        return resource
    return _FILES.enter_context(resources.as_file(resource))  # a zipped install: extracted until exit


def summary(name: str, width: int = 100) -> str:
    """The preset's description: the comment under its command line, cut to ``width`` characters."""
    words = []
    for line in text(name).splitlines()[1:]:
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
    about = " ".join(words)
    return about if len(about) <= width else about[: width - 3].rstrip() + "..."


def copy(name: str, dest: str | Path, *, overwrite: bool = False) -> Path:
    """Write preset ``name`` to ``dest`` for editing. Its first line becomes ``# lowrank ablate DEST`` (the command
    that runs the copy) and its ``results`` path ``out/STEM/STEM.jsonl`` (STEM: the copy's file name without
    ``.toml``), so runs of the copy never land in the preset's results. Refuses to overwrite unless asked."""
    dest = Path(dest)
    if dest.suffix != ".toml":
        raise ValueError(f"{dest}: the copy must be a .toml file, e.g. mine.toml")
    if dest.exists() and not overwrite:
        raise ValueError(f"{dest} exists; choose another name or pass --force to overwrite it")
    name = _name(name)
    body = text(name).split("\n", 1)
    rest = body[1] if len(body) > 1 else ""
    stem = dest.stem
    rest, n = _RESULTS.subn(f'results = "out/{stem}/{stem}.jsonl"', rest, count=1)
    if n != 1:
        raise ValueError(f"preset {name!r} has no results = \"...\" line to rewrite; this is a bug in the preset")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(f"# lowrank ablate {dest}\n{rest}")
    return dest
