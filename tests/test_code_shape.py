"""The shape the design promises a newcomer, checked: no function in ``lowrank/`` longer than 60 lines, and no
block of six or more lines repeated in ``lowrank/`` (a repeat is a helper waiting to be written)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import lowrank

ROOT = Path(lowrank.__file__).parent
MAX_FUNCTION_LINES = 60
MIN_REPEAT = 6


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` for every function (signature, docstring and body) over ``limit`` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of lines that carry code: blanks, comments, docstring-only and lone-bracket
    lines are skipped, so only repeated logic counts."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("  #")[0].strip()
        if not text or text.startswith(("#", '"""', "'''")) or len(text) <= 3 or text.startswith(("import ", "from ")):
            continue
        out.append((i, text))
    return out


def repeated_blocks(root: Path = ROOT, size: int = MIN_REPEAT) -> list[str]:
    """Every window of ``size`` consecutive code lines that occurs more than once (anywhere in ``root``)."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        lines = _code_lines(path)
        for j in range(len(lines) - size + 1):
            window = tuple(t for _, t in lines[j:j + size])
            seen[window].append(f"{path.relative_to(root.parent)}:{lines[j][0]}")
    return [" and ".join(places) + ":\n    " + "\n    ".join(w) for w, places in seen.items() if len(places) > 1]


RUNNER = ROOT.parent / "lowrank_ablation"  # the runner, shipped beside the library, held to the same shape


def test_no_function_in_lowrank_is_longer_than_60_lines():
    assert long_functions() + long_functions(RUNNER) == []


def test_no_block_of_six_code_lines_is_repeated_in_lowrank():
    assert repeated_blocks() + repeated_blocks(RUNNER) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    body = "\n".join(f"    x{i} = compute({i})" for i in range(6))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(f"def f():\n{body}\n    return x0\n\n\ndef g():\n{body}\n    return x1\n"
                                           + "def h():\n" + "".join(f"    y{i} = {i}\n" for i in range(61)))
    assert [r.split(" ")[1] for r in long_functions(tmp_path / "pkg")] == ["h"]
    assert len(repeated_blocks(tmp_path / "pkg")) == 1
