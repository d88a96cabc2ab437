"""The statistics a data pass can collect, one registered class per file (``lowrank.register_statistic``).

An initializer names what it needs (``needs = ("gradient",)``); :func:`lowrank.init.collect.collect_statistics`
builds one instance of each named class and runs a single pass that feeds them all. Every module of this package
is imported here, so a new statistic is one new file: a :class:`Statistic` subclass with the decorator.
"""

from .base import GradientSink, LayerInput, Statistic
from ...registry import import_package

import_package(__name__, __path__)

__all__ = ["GradientSink", "LayerInput", "Statistic"]
