"""The method tables follow the registries: the docs pages' generated blocks are current
(``python -m experiments.gen_docs``), and docs/methods.md has a row for every registered method."""

from __future__ import annotations

from pathlib import Path

import pytest

import lowrank
from experiments.gen_docs import pages, render
from lowrank import registry

ROOT = Path(__file__).resolve().parents[1]


def test_the_method_tables_are_generated_and_current():
    found = {p.name: p.read_text() for p in pages()}
    assert sorted(found) == ["adapters.md", "chains.md", "initializers.md", "preconditioners.md"]
    for name, text in found.items():
        assert text.count("<!-- begin generated: ") == 1, name
        assert render(text) == text, f"docs/{name} is stale: run python -m experiments.gen_docs"


def test_a_new_registration_makes_the_readme_stale():
    @lowrank.register_initializer("docs_probe_init")
    class Probe(lowrank.get_initializer("kaiming")):
        """A probe: registered for this test only."""
    try:
        assert "`docs_probe_init`" in render((ROOT / "docs" / "initializers.md").read_text())
    finally:
        registry.INITIALIZERS.unregister("docs_probe_init")


@pytest.mark.parametrize("reg", [registry.INITIALIZERS, registry.PRECONDITIONERS, registry.ADAPTERS, registry.CHAINS])
def test_docs_methods_has_a_row_for_every_registered_method(reg):
    methods = (ROOT / "docs" / "methods.md").read_text()
    import re

    missing = [n for n in reg.list() if not re.search(rf"^(?:\| |- )`{re.escape(n)}`", methods, re.M)]
    assert not missing, f"docs/methods.md lacks the formula row of {reg.kind}(s) {missing}"
