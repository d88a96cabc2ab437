"""Initializers. Importing this package registers the built-in ones (one method per file)."""

from .base import InitResult, Initializer, LayerContext, layer_seed
from . import gaussian, kaiming  # noqa: F401  (registration side effects)

__all__ = ["InitResult", "Initializer", "LayerContext", "layer_seed"]
