#!/usr/bin/env bash
# Refreshes requirements/lock.txt, the exact versions the README's commands install (scripts/setup.sh), with
# pip-compile (pip-tools) from pyproject.toml's `dev` extra, under the pinned CPU torch (requirements/torch.txt).
# Run it when a dependency range in pyproject.toml changes, or after `bash scripts/test.sh --latest` passed
# on newer releases you want to adopt; then run `bash scripts/test.sh` and commit the lock with the change.
# Usage: bash scripts/lock.sh [--upgrade-package NAME ...]   (extra arguments go to pip-compile)
set -euo pipefail
cd "$(dirname "$0")/.."
tools=".venv-lock"
if [ ! -x "$tools/bin/pip-compile" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q "pip-tools==7.7.0"
fi
# lowrank itself is declared "unsafe" so that it is left out (the dev extra names it, and its path is this
# clone's); setuptools, which torch needs at run time, is pinned like everything else.
log="$(mktemp)"
if ! "$tools/bin/pip-compile" --quiet --upgrade --unsafe-package lowrank --strip-extras --no-emit-index-url \
    --no-emit-find-links --extra dev -c requirements/torch.txt --output-file requirements/lock.txt "$@" \
    pyproject.toml 2>"$log"; then
  cat "$log" >&2; exit 1
fi
echo "[lock] requirements/lock.txt: $(grep -c '==' requirements/lock.txt) pinned packages"
