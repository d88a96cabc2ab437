#!/usr/bin/env bash
# The main job: sets up the machine, then runs the default ablation demo offline
# (full fine-tuning, vanilla LoRA, PiSSA, LoRA-GA on WordNet supersenses with MiniLM; ~8 min on 2 cores).
# Usage: bash scripts/demo.sh [PRESET | CONFIG.toml] [--summary-only] [--json]
#   (the same as `lowrank ablate demo` in the set-up venv; `lowrank presets` lists the presets)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config="demo"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then config="$1"; shift; fi
exec .venv/bin/lowrank ablate "$config" "$@"
