"""Every cross-reference in a docstring (``:func:`name```, ``:class:`~lowrank.x.Y```, ...) names an object that
exists: an absolute name (``lowrank.``, ``torch.``, ...) is imported and looked up; a relative one is looked up
where the docstring is (the enclosing class, then the module's namespace), as Sphinx and mkdocstrings resolve it.
The site renders these as code (``docs/_ext/griffe_roles.py``); this is what makes a stale one fail."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import lowrank

ROOT = Path(lowrank.__file__).parent
ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`<>]+)`")
MISSING = object()


def _absolute(name: str):
    """The object named ``name`` (``package.module.Class.attr``), or ``MISSING``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, MISSING)
            if obj is MISSING:
                return MISSING
        return obj
    return MISSING


def references(path: Path):
    """``(module, class or None, target, line)`` for every role in a docstring of ``path``."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    tree = ast.parse(path.read_text())

    def walk(node, cls):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                inner = child.name if isinstance(child, ast.ClassDef) else cls  # a class's text names its members
                doc = ast.get_docstring(child, clean=False) or ""
                for m in ROLE.finditer(doc):
                    yield module, inner, m.group(1).strip().rstrip("()"), child.lineno
                yield from walk(child, inner)
            elif isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant) \
                    and isinstance(child.value.value, str):  # attribute docstrings
                for m in ROLE.finditer(child.value.value):
                    yield module, cls, m.group(1).strip().rstrip("()"), child.lineno
            else:
                yield from walk(child, cls)

    for m in ROLE.finditer(ast.get_docstring(tree, clean=False) or ""):
        yield module, None, m.group(1).strip().rstrip("()"), 1
    yield from walk(tree, None)


def resolves(module: str, cls: str | None, target: str) -> bool:
    if _absolute(target) is not MISSING:
        return True
    mod = importlib.import_module(module)
    scopes = [getattr(mod, cls, None)] if cls else []
    scopes.append(mod)
    head, *rest = target.split(".")
    for scope in scopes:
        obj = getattr(scope, head, MISSING)
        if obj is MISSING and scope is mod:  # a submodule of a package named relatively
            obj = _absolute(f"{module}.{head}")
        for attr in rest:
            obj = MISSING if obj is MISSING else getattr(obj, attr, MISSING)
        if obj is not MISSING:
            return True
    return False


def test_every_docstring_reference_names_an_object_that_exists():
    files = sorted(ROOT.rglob("*.py")) + sorted((ROOT.parent / "lowrank_ablation").rglob("*.py"))
    refs = [r for path in files for r in references(path)]
    assert len(refs) > 150  # the scan sees them
    broken = sorted({f"{m}:{line} {target}" for m, cls, target, line in refs if not resolves(m, cls, target)})
    assert not broken, "docstring references to names that do not exist:\n" + "\n".join(broken)


def test_a_stale_reference_is_caught(tmp_path):
    assert resolves("lowrank.inject", None, "lowrank.inject")
    assert resolves("lowrank.chains", None, "ChainRun")
    assert not resolves("lowrank.inject", None, "lowrank.no_such_function")
    assert not resolves("lowrank.weights", None, "renamed_away")
