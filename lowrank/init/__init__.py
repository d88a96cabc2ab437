"""Initializers. Importing this package registers the built-in ones: every module here is imported
(``lowrank.registry.import_package``), so a new method is one new file."""

from .base import InitResult, Initializer, LayerContext, RankAllocation, layer_seed
from .gradient import DataInitializer, DataOptions, GradientInitializer, GradientOptions, estimate_gradients
from .budget import RankBudget
from ..registry import import_package

import_package(__name__, __path__)

__all__ = ["InitResult", "Initializer", "LayerContext", "RankAllocation", "layer_seed", "GradientInitializer", "GradientOptions",
           "DataInitializer", "DataOptions", "RankBudget", "estimate_gradients"]
