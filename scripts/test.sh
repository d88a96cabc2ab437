#!/usr/bin/env bash
# Runs the test suite after setting up the machine. Usage:
#   bash scripts/test.sh            # fast suite (what CI runs)
#   bash scripts/test.sh --slow     # only the marked slow tests (offline MiniLM, real data)
#   bash scripts/test.sh -k lora_ga # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow "$@"
fi
exec .venv/bin/python -m pytest "$@"
