"""Offline models and data for the experiments: the MiniLM encoder (``minilm``), WordNet supersenses
(``wordnet``) and their classification batches (``batches``), the SmolLM2 decoder LM (``smollm2``), and
prompt/response examples from a jsonl file or a reasoning-gym generator (``examples``). The library
(``lowrank``) imports none of them."""
