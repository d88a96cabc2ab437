"""Preconditioners for LoRA factors; importing this package registers the built-in ones."""

from .base import Preconditioner
from . import identity  # noqa: F401  (registration side effect)

__all__ = ["Preconditioner"]
