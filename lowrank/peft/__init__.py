"""Interoperate with PEFT (``pip install lowrank[peft]``; importing lowrank never needs peft).

- ``export(model, directory)``: write a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained(
  original_base_model, directory)`` loads and that reproduces the lowrank model. Initializers that
  offset the base weight are exported as the exact rank-``2r`` LoRA on the original weights
  (docs/interop.md).
- ``load(model, directory)``: load a PEFT LoRA adapter into a plain model as lowrank adapters, to
  continue training or to analyse it with ``lowrank.theory``.
- ``initialize(peft_model, init="lora_ga", data=..., loss_fn=...)``: run any registered lowrank
  initializer on an existing PEFT LoRA model in place, base-weight offset included.
"""

from .export import PEFT_CONFIG, PEFT_WEIGHTS, export
from .initialize import initialize
from .load import load

import_ = load

__all__ = ["export", "load", "import_", "initialize", "PEFT_CONFIG", "PEFT_WEIGHTS"]
