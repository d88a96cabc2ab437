"""Third-party plug-ins load once ``import lowrank`` has finished: a real entry point (a ``*.dist-info`` with
``entry_points.txt`` on ``sys.path``, in a fresh interpreter) whose module is docs/plugins.md's plug-in example,
written against the public API only; a module dropped into ``lowrank/init/`` (a copy of the package) that imports
from the top-level ``lowrank``; a failing plug-in's warning and its retry; ``needs`` checked when built."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import lowrank
from lowrank import registry

ROOT = Path(__file__).resolve().parents[1]

USE = textwrap.dedent('''
    import torch
    from torch import nn
    import lowrank

    assert lowrank.list_initializers("energy_scaled", uses_data=True) == ["energy_scaled"]
    assert "input_energy" in lowrank.list_statistics() and "sign" in lowrank.list_preconditioners()
    assert lowrank.list_adapters("lora_fp32") == ["lora_fp32"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    data = [torch.randn(16, 64) * 3 for _ in range(2)]
    before = model(data[0])
    cfg = lowrank.LoRAConfig(rank=8, targets=["0"], init="energy_scaled", adapter="lora_fp32")
    lowrank.inject(model, cfg, data=data, progress=False)
    layer = dict(lowrank.adapted_layers(model))["0"]
    assert type(layer).__name__ == "LoRAFloat32", type(layer)
    energy = torch.cat(data).square().sum(1).mean()   # what the statistic measures: mean ||x||^2 = 64 * 9
    ratio = float(layer.A.std() * energy.sqrt())      # A's std is 1 / sqrt(energy): ratio ~ 1 (512 draws)
    assert 0.85 < ratio < 1.15, ratio
    assert torch.equal(model(data[0]), before)       # B = 0: the output is unchanged at step 0
    opt = lowrank.optim.PreconditionedOptimizer(model, "sgd", "sign", lr=0.01)
    model(data[0]).square().mean().backward()
    grad_B = layer.B.grad.clone()
    B0 = layer.B.detach().clone()
    opt.step()
    torch.testing.assert_close(layer.B.detach(), B0 - 0.01 * grad_B.sign())  # signSGD on the factors
    small = lowrank.inject(nn.Sequential(nn.Linear(64, 8)), lowrank.LoRAConfig(
        rank=4, targets=["0"], init="scaled_kaiming", init_options={"factor": 0.25}))
    A = dict(lowrank.adapted_layers(small))["0"].A
    assert float(A.abs().max()) <= 0.25 / 8 and float(A.abs().max()) > 0.2 / 8   # U(-f/sqrt(n), f/sqrt(n)), n = 64
    print("PLUGIN-OK")
''')


def readme_plugin() -> str:
    """The plug-in module of docs/plugins.md: the ```python block that starts with ``# my_methods.py``."""
    blocks = re.findall(r"```python\n(# my_methods\.py.*?)```", (ROOT / "docs" / "plugins.md").read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/plugins.md must show the plug-in module once (a block starting '# my_methods.py')"
    return blocks[0]


def run_python(code: str, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-W", "error::UserWarning:lowrank.registry", "-c", code], env=env,
                          capture_output=True, text=True, timeout=300, cwd=pythonpath[0])


def test_an_entry_point_plugin_written_as_the_readme_shows_is_listed_and_usable_after_import(tmp_path):
    site = tmp_path / "site"
    (site / "my_methods-0.1.dist-info").mkdir(parents=True)
    (site / "my_methods.py").write_text(readme_plugin())
    (site / "my_methods-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 0.1\n")
    (site / "my_methods-0.1.dist-info" / "entry_points.txt").write_text('[lowrank.plugins]\nmy_methods = my_methods\n')
    out = run_python(USE, [site])
    assert out.returncode == 0 and "PLUGIN-OK" in out.stdout, out.stderr[-3000:]


def test_a_module_dropped_into_lowrank_init_may_import_from_the_top_level_package(tmp_path):
    """A copy of the package with one more file in ``lowrank/init/`` (the tree itself is left alone)."""
    shutil.copytree(ROOT / "lowrank", tmp_path / "lowrank", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "lowrank" / "init" / "zz_dropped.py").write_text(textwrap.dedent('''
        from lowrank import InitResult, Initializer, register_initializer

        @register_initializer("dropped_in")
        class DroppedIn(Initializer):
            """Zero factors (a probe)."""

            def init_layer(self, ctx):
                return InitResult(A=ctx.zeros(ctx.rank, ctx.n), B=ctx.zeros(ctx.m, ctx.rank))
    '''))
    code = (f"import lowrank; assert lowrank.__file__.startswith({str(tmp_path)!r}), lowrank.__file__; "
            "assert 'dropped_in' in lowrank.list_initializers(); print('DROPPED-OK')")
    out = run_python(code, [tmp_path])
    assert out.returncode == 0 and "DROPPED-OK" in out.stdout, out.stderr[-3000:]


class _EP:
    def __init__(self, name, load):
        self.name, self.value, self._load = name, f"pkg_{name}", load

    def load(self):
        return self._load()


def test_a_failing_plugin_warns_with_its_name_and_error_and_a_later_call_retries(monkeypatch):
    broken = {"yes": True}

    def load():
        if broken["yes"]:
            raise ImportError("No module named 'missing_dep'")
        return lambda: registry.INITIALIZERS.register("retry_probe", lowrank.get_initializer("kaiming"))

    monkeypatch.setattr(metadata, "entry_points", lambda group: [_EP("flaky", load)])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_loaded", set())
    monkeypatch.setattr(registry, "_failed", {})
    try:
        with pytest.warns(UserWarning, match=r"plugin 'flaky' \(pkg_flaky\).*missing_dep.*load_plugins"):
            assert "retry_probe" not in lowrank.list_initializers()
        with pytest.raises(KeyError, match=r"failed to load: flaky \(pkg_flaky\): ImportError"):
            lowrank.get_initializer("retry_probe")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lowrank.list_initializers()  # the automatic load runs once: no second warning
        broken["yes"] = False
        assert lowrank.load_plugins() == {}
        assert "retry_probe" in lowrank.list_initializers()
        assert lowrank.load_plugins() == {}  # a loaded plug-in is not imported again
        assert registry.INITIALIZERS.list("retry_probe") == ["retry_probe"]
    finally:
        if "retry_probe" in registry.INITIALIZERS:
            registry.INITIALIZERS.unregister("retry_probe")


def test_plugins_never_load_while_lowrank_is_importing(monkeypatch):
    calls = []
    monkeypatch.setattr(metadata, "entry_points", lambda group: [_EP("early", lambda: lambda: calls.append(1))])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_loaded", set())
    monkeypatch.setattr(registry, "_ready", False)  # as during `import lowrank`
    lowrank.list_initializers()
    assert calls == []
    monkeypatch.setattr(registry, "_ready", True)
    lowrank.list_initializers()
    lowrank.list_adapters()
    assert calls == [1]


def test_an_initializers_needs_are_checked_when_it_is_built_not_when_defined():
    class NeedsLater(lowrank.init.DataInitializer):
        """A probe whose statistic registers after it."""
        needs = ("later_stat",)

        def init_layer(self, ctx):
            raise NotImplementedError

    with pytest.raises(ValueError, match=r"declares unknown statistics \['later_stat'\]"):
        NeedsLater()
    from lowrank.init.stats import Statistic

    @lowrank.register_statistic("later_stat")
    class Later(Statistic):
        """A probe statistic."""
        provides = ("later_stat",)

    try:
        assert NeedsLater().needs == ("later_stat",)
    finally:
        registry.STATISTIC_REGISTRY.unregister("later_stat")
    with pytest.raises(TypeError, match="needs must be a tuple of statistic names"):
        class Bad(lowrank.init.DataInitializer):
            needs = "gradient"
