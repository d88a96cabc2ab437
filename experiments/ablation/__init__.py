"""The ablation runner: sweeps of initializer x preconditioner x rank x learning rate x seed.

    python -m experiments.ablate experiments/configs/demo.toml          # run (resumes), then summarize
    python -m experiments.ablate experiments/configs/demo.toml --summary-only

``config`` validates a TOML sweep before anything runs, ``tasks`` builds models and data,
``run`` trains one arm and appends one JSON line per run, ``summary`` makes the tables and plots.
"""
