#!/usr/bin/env bash
# The main job: sets up the machine, then runs the default demo offline.
# Usage: bash scripts/demo.sh [extra arguments for experiments/demo.py]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m experiments.demo "$@"
