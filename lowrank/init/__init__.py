"""Initializers. Importing this package registers the built-in ones (one method per file)."""

from .base import InitResult, Initializer, LayerContext, layer_seed
from .gradient import DataInitializer, DataOptions, GradientInitializer, GradientOptions, estimate_gradients
from .budget import RankBudget
from . import corda, eva, gaussian, gora, kaiming, lora_ga, lora_one, lora_sb, lora_xs, milora, olora, pissa  # noqa: F401

__all__ = ["InitResult", "Initializer", "LayerContext", "layer_seed", "GradientInitializer", "GradientOptions",
           "DataInitializer", "DataOptions", "RankBudget", "estimate_gradients"]
