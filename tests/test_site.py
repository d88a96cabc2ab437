"""The documentation site builds offline with ``mkdocs build --strict`` (a broken link, anchor, reference or
docstring warning fails it), and its API reference renders every public name of every documented package."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"lowrank": "lowrank", "lowrank.init": "init", "lowrank.adapters": "adapters", "lowrank.optim": "optim",
         "lowrank.chains": "chains", "lowrank.theory": "theory", "lowrank.peft": "peft", "lowrank.hf": "hf",
         "lowrank_ablation": "ablation"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return out


def _ids(page: Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page.read_text()))


@pytest.mark.parametrize("module", sorted(PAGES))
def test_the_api_reference_renders_every_public_name(site, module):
    ids = _ids(site / "api" / PAGES[module] / "index.html")
    mod = importlib.import_module(module)
    missing = []
    for name in mod.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(mod, name)
        where = {f"{module}.{name}"}
        if hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
            where.add(f"{obj.__module__}.{obj.__qualname__}")  # documented under its full path
        if not where & ids:
            missing.append(name)
    assert not missing, f"docs/api/{PAGES[module]}.md does not render {missing}"


def test_every_page_is_built_and_the_method_tables_are_on_the_site(site):
    for page in ROOT.glob("docs/*.md"):
        assert (site / ("" if page.stem == "index" else page.stem) / "index.html").is_file(), page.name
    html = (site / "initializers" / "index.html").read_text()
    assert "lora_ga" in html and "pissa" in html
    # the docstrings' Sphinx roles are rendered as code, not left as ":func:`...`"
    assert not re.search(r":(func|class|mod|meth|attr|data):", (site / "api" / "lowrank" / "index.html").read_text())


def test_a_broken_link_fails_the_build(tmp_path):
    """--strict is what makes the build a check: a page linking to a missing page must fail it."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# x\n\n[gone](nowhere.md)\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: probe\nstrict: true\n")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "s")],
                         cwd=tmp_path, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0 and "nowhere.md" in run.stdout + run.stderr
