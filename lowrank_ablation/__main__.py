"""``python -m lowrank_ablation ...``: the ``lowrank`` command where its console script is not on PATH (and the
form ``torchrun -m`` takes)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
