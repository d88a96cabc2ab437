"""Preconditioners for LoRA factors and the optimizer that applies them.

Importing this package registers the built-in ones (``lowrank.list_preconditioners()``): every module here
is imported, so a new method is one new file. See ``PreconditionedOptimizer`` and ``build_optimizer``.
"""

from .base import Preconditioner
from .state import Update
from ..registry import import_package

import_package(__name__, __path__)
from .chain import Chain, chain  # noqa: E402
from .lora_pro import lora_pro_directions  # noqa: E402
from .optimizer import BASES, PreconditionedOptimizer, build_optimizer  # noqa: E402

__all__ = ["Preconditioner", "Update", "Chain", "chain", "PreconditionedOptimizer", "build_optimizer", "BASES",
           "lora_pro_directions"]
