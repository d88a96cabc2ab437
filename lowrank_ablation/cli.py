"""The ``lowrank`` command (installed with ``pip install lowrank[experiments]``), modelled on torchtune's
``tune ls`` / ``tune cp`` / ``tune run``:

    lowrank presets                          # the bundled sweep configs, with a line on each
    lowrank copy demo mine.toml [--force]    # write one to edit
    lowrank ablate mine.toml [--summary-only] [--json] [--results PATH] [--no-progress]
    lowrank ablate demo                      # a preset runs by name

A user's own task, initializer or preconditioner is found through the ``lowrank.plugins`` entry points of an
installed package, or a config's ``plugins = ["module"]`` list (the config's folder is searched first); a task
imports its base class with ``from lowrank_ablation import Task, register_task``. Under ``torchrun`` use the
module form: ``torchrun --nproc-per-node 2 -m lowrank_ablation ablate CONFIG``.
"""

from __future__ import annotations

import argparse
import sys

from . import presets


def _presets(argv) -> int:
    p = argparse.ArgumentParser(prog="lowrank presets", description="List the bundled sweep configs.")
    p.parse_args(argv)
    names = presets.names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {presets.summary(name)}")
    return 0


def _copy(argv) -> int:
    p = argparse.ArgumentParser(prog="lowrank copy", description=presets.copy.__doc__)
    p.add_argument("preset", help="a bundled preset's name (lowrank presets lists them)")
    p.add_argument("dest", help="the copy, a .toml file")
    p.add_argument("--force", action="store_true", help="overwrite dest if it exists")
    args = p.parse_args(argv)
    try:
        dest = presets.copy(args.preset, args.dest, overwrite=args.force)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {dest} (from preset {args.preset}); edit it, then: lowrank ablate {dest}")
    return 0


def _ablate(argv) -> int:
    try:
        from .ablate import main  # transformers, scipy, ...: only for the command that trains
    except ImportError as exc:
        print(f"error: lowrank ablate needs the runner's dependencies, which are not installed here ({exc}); "
              "install them with: pip install 'lowrank[experiments]'", file=sys.stderr)
        return 2
    return main(argv, prog="lowrank ablate")


COMMANDS = {"ablate": _ablate, "presets": _presets, "copy": _copy}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from lowrank._version import __version__

        print(f"lowrank {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}; the commands are {sorted(COMMANDS)} (lowrank --help)",
              file=sys.stderr)
        return 2
    return command(argv[1:])
