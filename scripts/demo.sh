#!/usr/bin/env bash
# The main job: sets up the machine, then runs the default ablation demo offline
# (full fine-tuning, vanilla LoRA, PiSSA, LoRA-GA on WordNet supersenses with MiniLM; ~8 min on 2 cores).
# Usage: bash scripts/demo.sh [experiments/configs/OTHER.toml] [--summary-only]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config="experiments/configs/demo.toml"
if [ $# -gt 0 ] && [[ "$1" == *.toml ]]; then config="$1"; shift; fi
exec .venv/bin/python -m experiments.ablate "$config" "$@"
