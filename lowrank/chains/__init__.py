"""Chains: training-time procedures over links of low-rank training (train, merge into the base, restart).
Importing this package registers the built-in ones (``lowrank.list_chains()``): every module here is imported,
so a new chain is one new file."""

from .base import Chain, ChainOptions, Link
from .run import ChainRun, start_chain
from ..registry import import_package

import_package(__name__, __path__)

__all__ = ["Chain", "ChainOptions", "Link", "ChainRun", "start_chain"]
