"""The import graphs of ``lowrank/`` and ``experiments/`` (top-level and function-level imports alike) have no
cycle: every module can be read knowing only the modules below it, and no lazy import hides a circle. The arrows
point down: the core library never imports the ablation runner (``lowrank_ablation``), and nothing installed
imports the repository's ``experiments/`` scripts."""

from __future__ import annotations

import ast
from pathlib import Path

import lowrank

ROOT = Path(lowrank.__file__).parent
EXPERIMENTS = ROOT.parent / "experiments"
RUNNER = ROOT.parent / "lowrank_ablation"


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> modules it imports`` (within lowrank), from every import statement in its source."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                for alias in node.names:
                    target = f"{mod}.{alias.name}"
                    deps.add(target if target in mods else mod)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = edges(modules())
    assert graph["lowrank.inject"] and "lowrank.config" in graph["lowrank.inject"]  # the scan sees imports
    assert cycles(graph) == []


def test_the_base_weight_helpers_sit_below_the_adapters_and_the_adapters_below_the_initializers():
    """``weights`` (how a base layer stores its weight, the offset formula) is imported by the adapters, never the
    other way round; the initializers import the adapter contract, never the other way round."""
    graph = edges(modules())
    assert "lowrank.weights" in graph["lowrank.adapters.lora"]
    assert not {d for d in graph["lowrank.weights"] if d.startswith("lowrank.adapters")}
    # an adapter's input (InitResult) is part of the adapter contract: the adapters never import the initializers
    adapters = [m for m in graph if m.startswith("lowrank.adapters")]
    assert not {d for m in adapters for d in graph[m] if d.startswith("lowrank.init")}
    # PEFT conversion lives in lowrank.peft (a format per adapter), never in a layer's file
    assert not {d for m in adapters for d in graph[m] if d.startswith("lowrank.peft")}


def test_the_experiments_import_graph_has_no_cycle():
    mods = {**modules(), **modules(RUNNER), **modules(EXPERIMENTS)}
    graph = edges(mods)
    assert "lowrank_ablation.curves" in graph["lowrank_ablation.plots"]  # relative imports are seen
    assert "lowrank_ablation.ablate" in graph["experiments.ablate"]  # and absolute ones across the two trees
    assert cycles(graph) == []


def test_the_core_never_imports_the_runner_and_nothing_installed_imports_the_scripts():
    mods = {**modules(), **modules(RUNNER), **modules(EXPERIMENTS)}
    graph = edges(mods)
    core = [m for m in graph if m == "lowrank" or m.startswith("lowrank.")]
    runner = [m for m in graph if m.startswith("lowrank_ablation")]
    assert len(core) > 50 and len(runner) > 20
    assert {m: sorted(d for d in graph[m] if d.startswith("lowrank_ablation"))
            for m in core if any(d.startswith("lowrank_ablation") for d in graph[m])} == {}
    assert {m: sorted(d for d in graph[m] if d.startswith("experiments"))
            for m in core + runner if any(d.startswith("experiments") for d in graph[m])} == {}


def dangling(mods: dict[str, Path]) -> list[str]:
    """``module: target`` for every import of a ``lowrank`` or ``experiments`` module that does not exist (a
    module or a name bound in an existing module's ``__init__``): what a move leaves behind."""
    out = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = [node.module] if node.module else []
                targets = [".".join(base + module) if node.level else (node.module or "")]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            out += [f"{name}: {t}" for t in targets if t.split(".")[0] in ("lowrank", "experiments") and t not in mods]
    return out


def test_no_import_points_at_a_module_that_is_not_there(tmp_path):
    mods = {**modules(), **modules(RUNNER), **modules(EXPERIMENTS)}
    assert dangling(mods) == []
    # what the runner's move left behind once: a relative import of the folder that moved away
    planted = tmp_path / "bench_x.py"
    planted.write_text("from .ablation.memory import PeakMemory\nfrom lowrank_ablation.memory import PeakMemory\n")
    assert dangling({**mods, "experiments.bench_x": planted}) == ["experiments.bench_x: experiments.ablation.memory"]


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
