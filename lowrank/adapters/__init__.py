"""Adapter layers; importing this package registers the built-in ones (every module here is imported, so a
new adapter is one new file)."""

from ..weights import SUPPORTED_TYPES, is_conv1d, weight_shape, weight_view
from .base import Adapter
from .lora import LoRALayer
from .dora import DoRALayer
from .lora_xs import LoRAXSLayer
from ..registry import import_package

import_package(__name__, __path__)

__all__ = ["Adapter", "LoRALayer", "DoRALayer", "LoRAXSLayer", "SUPPORTED_TYPES", "is_conv1d", "weight_shape", "weight_view"]
