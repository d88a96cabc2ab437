#!/usr/bin/env bash
# Runs the test suite after setting up the machine. Usage:
#   bash scripts/test.sh            # fast suite at the locked versions (what CI runs)
#   bash scripts/test.sh --slow     # only the marked slow tests (offline MiniLM, real data)
#   bash scripts/test.sh --latest   # fast suite against the newest releases (.venv-latest, no lock)
#   bash scripts/test.sh -k lora_ga # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
venv=".venv"; marker=()
case "${1:-}" in
  --latest) shift; venv=".venv-latest"; bash scripts/setup.sh --latest ;;
  --slow) shift; marker=(-m slow); bash scripts/setup.sh ;;
  *) bash scripts/setup.sh ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
names = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl", "numpy"]
print("[test] " + ", ".join(f"{n} {version(n)}" for n in names))
PY
exec "$venv/bin/python" -m pytest "${marker[@]}" "$@"
