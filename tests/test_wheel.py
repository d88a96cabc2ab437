"""The runner ships: a wheel built from (a copy of) this checkout, installed into a fresh venv, gives the
``lowrank`` command with its bundled presets, run from a folder outside the checkout, and finds a user's task
through the ``lowrank.plugins`` entry points of another installed distribution.

The fresh venv gets the wheel alone (``--no-deps``); its dependencies (torch, transformers, ...) are borrowed from
the test interpreter's site-packages through a ``.pth`` line, which puts them after the venv's own, so ``lowrank``
itself is the wheel's (asserted). Offline: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
from lowrank_ablation import Task, register_task
from lowrank_ablation.tasks.synthetic_lowrank import SyntheticLowRank


@register_task("wheel-probe")
class WheelProbe(SyntheticLowRank):
    """The synthetic task under another name, registered by an installed distribution's entry point."""


assert issubclass(WheelProbe, Task)
'''


def _run(cmd, cwd, env, timeout=300):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy of what the sdist holds: the build writes build/ and *.egg-info beside it
    for package in ("lowrank", "lowrank_ablation"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{build.stderr[-3000:]}")
    (wheel,) = (tmp / "dist").glob("lowrank-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    borrowed = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "zz_borrowed_deps.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")
    # a user's plug-in distribution: one module and an entry point in the lowrank.plugins group
    (purelib / "wheel_probe_plugin.py").write_text(PLUGIN)
    info = purelib / "wheel_probe_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wheel-probe-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lowrank.plugins]\nwheel_probe = wheel_probe_plugin\n")
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return venv, work, env


def test_the_wheel_holds_the_runner_and_its_presets(installed):
    venv, work, env = installed
    where = _run([str(venv / "bin" / "python"), "-c", "import lowrank_ablation.presets as p; print(p.__file__)"],
                 work, env)
    assert str(venv) in where, f"lowrank was not imported from the wheel: {where}"
    listed = _run(["lowrank", "presets"], work, env)
    names = [line.split()[0] for line in listed.splitlines()]
    for name in ("demo", "lm-ablation", "fair-ablation", "synthetic-fair", "paper/metamath-gsm8k"):
        assert name in names, listed


def test_copy_then_ablate_a_preset_from_another_folder(installed):
    venv, work, env = installed
    _run(["lowrank", "copy", "demo", "mine.toml"], work, env)
    mine = (work / "mine.toml").read_text()
    assert mine.startswith("# lowrank ablate mine.toml\n") and 'results = "out/mine/mine.jsonl"' in mine
    again = subprocess.run(["lowrank", "copy", "demo", "mine.toml"], cwd=work, env=env, capture_output=True,
                           text=True)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites without --force
    # the demo validates (task, arms, options) and summarizes its (empty) results from here
    _run(["lowrank", "ablate", "mine.toml", "--summary-only"], work, env)
    # a real sweep, shrunk: two arms of synthetic-fair, one seed, 20 steps, the task from the plug-in
    _run(["lowrank", "copy", "synthetic-fair", "tiny.toml"], work, env)
    text = (work / "tiny.toml").read_text()
    arms = [m.start() for m in re.finditer(r"^\[\[arm\]\]", text, re.MULTILINE)]
    text = text[: arms[2]]
    for old, new in [("seeds = [0, 1, 2, 3, 4]", "seeds = [0]"), ('lrs = "search"', "lrs = [1e-2]"),
                     ("steps = 300", "steps = 20"), ("eval_every = 50", "eval_every = 10"),
                     ('task = "synthetic-lowrank"', 'task = "wheel-probe"')]:
        assert old in text, old
        text = text.replace(old, new)
    text = re.sub(r"\n\[search\]\n(.+\n)+", "\n", text)
    (work / "tiny.toml").write_text(text)
    summary = _run(["lowrank", "ablate", "tiny.toml", "--no-progress"], work, env)
    records = [json.loads(line) for line in (work / "out" / "tiny" / "tiny.jsonl").read_text().splitlines()]
    assert sorted(r["arm"] for r in records) == ["LoRA", "PiSSA"]
    assert all(r["task"] == "wheel-probe" and r["status"] == "ok" and r["steps"] == 20 for r in records)
    assert "LoRA" in summary and "PiSSA" in summary


def test_the_module_form_is_the_same_command(installed):
    venv, work, env = installed
    out = _run([str(venv / "bin" / "python"), "-m", "lowrank_ablation", "presets"], work, env)
    assert out == _run(["lowrank", "presets"], work, env)
    bad = subprocess.run(["lowrank", "ablate", "no-such-preset"], cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "no such config file" in bad.stderr and "demo" in bad.stderr


def test_presets_and_copy_need_only_the_core_and_ablate_says_what_is_missing(tmp_path):
    """Without the experiments extra: listing and copying presets work, ``ablate`` names the extra to install."""
    code = (
        "import sys\n"
        "for n in ['transformers', 'datasets', 'scipy', 'matplotlib', 'sklearn']: sys.modules[n] = None\n"
        "from lowrank_ablation.cli import main\n"
        f"assert main(['presets']) == 0 and main(['copy', 'demo', {str(tmp_path / 'd.toml')!r}]) == 0\n"
        "sys.exit(main(['ablate', 'demo', '--summary-only']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "pip install 'lowrank[experiments]'" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "d.toml").read_text().startswith("# lowrank ablate ")
