"""Runnable theory: the claims of LoRA initialization papers, checked on your own layers and models.

- ``first_step_update`` / ``first_step_direction``: the exact one-step SGD identity of ``s B A``.
- ``alignment`` (one layer), ``adapted_alignment`` (every adapted layer of a model), ``init_factors`` (any registered initializer on a given ``G``),
  ``gradients`` and ``compare`` (every layer of a real model, all inits on the same ``G``).
- ``scale_stability``: a mup-style coordinate check over width and rank.
- ``sharpness``: the largest-magnitude Hessian eigenvalue (plain or Adam-preconditioned) at any point.
- ``intruder_dimensions`` / ``model_intruder_dimensions``: new high-ranking singular vectors of a tuned weight
  (arXiv 2410.21228), a forgetting diagnostic.
- ``transfer_lr``: a configuration's learning rate predicted from a reference's, measured at initialization.
- ``python -m experiments.theory_report``: a per-layer alignment table on a real model.
"""

from .alignment import Alignment, adapted_alignment, alignment, compare, gradients, init_factors
from .first_step import factor_gradients, first_step_direction, first_step_update
from .intruders import Intruders, intruder_dimensions, model_intruder_dimensions
from .scale import loglog_slope, moments, scale_stability
from .sharpness import sharpness
from .transfer import Arm, FullFineTune, transfer_lr

__all__ = ["Alignment", "adapted_alignment", "alignment", "compare", "gradients", "init_factors", "factor_gradients",
           "first_step_direction", "first_step_update", "loglog_slope", "moments", "scale_stability", "sharpness",
           "transfer_lr", "Arm", "FullFineTune", "Intruders", "intruder_dimensions", "model_intruder_dimensions"]
