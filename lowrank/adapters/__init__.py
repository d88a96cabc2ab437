"""Adapter layers; importing this package registers the built-in ones."""

from .base import SUPPORTED_TYPES, Adapter, is_conv1d, weight_shape, weight_view
from .lora import LoRALayer
from .dora import DoRALayer
from .lora_xs import LoRAXSLayer

__all__ = ["Adapter", "LoRALayer", "DoRALayer", "LoRAXSLayer", "SUPPORTED_TYPES", "is_conv1d", "weight_shape", "weight_view"]
