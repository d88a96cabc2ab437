"""Offline models and data for the experiments: the SmolLM2 decoder LM (``smollm2``), prompt/response
examples from a jsonl file or a reasoning-gym generator (``examples``)."""
