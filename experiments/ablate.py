"""The repository's alias of ``lowrank ablate`` (kept for existing scripts and notes):

    python -m experiments.ablate CONFIG_OR_PRESET [--summary-only] [--json] ...
"""

from lowrank_ablation.ablate import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m experiments.ablate"))
