"""Regenerate the documentation's method tables from the registries (``lowrank.registry.Registry.table``).

    python -m experiments.gen_docs            # rewrite the generated blocks of docs/*.md
    python -m experiments.gen_docs --check    # exit 1 if any is stale (tests/test_docs.py runs this check)

A generated block sits between ``<!-- begin generated: NAME -->`` and ``<!-- end generated: NAME -->``; the
text around it is hand-written. A new method registered in its own file appears here on the next run.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import lowrank
from lowrank import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def pages() -> list[Path]:
    """The docs pages that hold a generated block (initializers, preconditioners, adapters, chains)."""
    return sorted(p for p in DOCS.glob("*.md") if "<!-- begin generated: " in p.read_text())
BLOCK = re.compile(r"(<!-- begin generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                   re.S)


def _shared_options() -> str:
    from lowrank.init.gradient import DataOptions, GradientOptions

    def fields(cls, skip=()):
        return ", ".join(f"`{f.name}={registry._default(f)}`" for f in dataclasses.fields(cls) if f.name not in skip)
    data = {f.name for f in dataclasses.fields(DataOptions)}
    return (f"`DataOptions` (every data-driven initializer): {fields(DataOptions)}.\n"
            f"`GradientOptions` (gradient-based ones): `DataOptions` + {fields(GradientOptions, data)}.")


BLOCKS = {
    "initializers": lambda: registry.INITIALIZERS.table() + "\n\n" + _shared_options(),
    "preconditioners": lambda: registry.PRECONDITIONERS.table(),
    "adapters": lambda: registry.ADAPTERS.table(),
    "chains": lambda: registry.CHAINS.table(),
}


def render(text: str) -> str:
    """``text`` with every generated block recomputed; ``KeyError`` for a block name this script does not know."""
    def sub(m: re.Match) -> str:
        return m.group(1) + BLOCKS[m.group("name")]() + "\n" + m.group(4)
    return BLOCK.sub(sub, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check; exit 1 if a page is stale")
    args = p.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text)
        if new == text:
            continue
        stale.append(page.name)
        if not args.check:
            page.write_text(new)
            print(f"wrote {page} (lowrank {lowrank.__version__})")
    if args.check and stale:
        print(f"stale method tables in docs/{stale}: run python -m experiments.gen_docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
