"""Initializers. Importing this package registers the built-in ones (one method per file)."""

from .base import InitResult, Initializer, LayerContext, layer_seed
from .gradient import GradientInitializer, GradientOptions, estimate_gradients
from . import gaussian, kaiming, lora_ga, lora_one, lora_sb, lora_xs, milora, olora, pissa  # noqa: F401

__all__ = ["InitResult", "Initializer", "LayerContext", "layer_seed", "GradientInitializer", "GradientOptions",
           "estimate_gradients"]
