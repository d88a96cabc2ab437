"""A griffe extension for the API reference: lowrank's docstrings cross-reference with Sphinx roles
(``:func:`lowrank.inject```); mkdocstrings renders Markdown, so each role becomes a code span of its target
(``~a.b`` shows ``b``, as Sphinx does)."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")


def _span(m: re.Match) -> str:
    target = m.group(1)
    shown = target.rsplit(".", 1)[-1] if m.group(0).split("`")[1].startswith("~") else target
    return f"`{shown}`"


class SphinxRolesToCode(griffe.Extension):
    def on_object(self, *, obj, loader, **kwargs) -> None:  # noqa: ARG002 - griffe's hook signature
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_span, obj.docstring.value)
