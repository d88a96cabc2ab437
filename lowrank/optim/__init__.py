"""Preconditioners for LoRA factors and the optimizer that applies them.

Importing this package registers the built-in ones: ``identity``, ``lora_plus``, ``riemannian``,
``lora_pro``, ``lora_fa``, ``lora_rite``. See ``PreconditionedOptimizer`` and ``build_optimizer``.
"""

from .base import Preconditioner
from . import identity, lora_fa, lora_plus, lora_pro, lora_rite, riemannian  # noqa: F401  (registration side effect)
from .chain import Chain, chain
from .lora_pro import lora_pro_directions
from .optimizer import BASES, PreconditionedOptimizer, build_optimizer

__all__ = ["Preconditioner", "Chain", "chain", "PreconditionedOptimizer", "build_optimizer", "BASES",
           "lora_pro_directions"]
