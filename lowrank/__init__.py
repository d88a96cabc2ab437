"""lowrank: a research framework for initializing and preconditioning LoRA adapters.

Quickstart::

    import lowrank
    cfg = lowrank.LoRAConfig(rank=8, alpha=16, targets=["query", "value"], init="kaiming")
    lowrank.inject(model, cfg)           # in place; base frozen, adapters trainable
    ...                                  # train
    lowrank.save_adapter(model, "out/")  # safetensors + JSON
"""

from ._version import __version__
from .registry import (
    get_adapter,
    get_chain,
    get_initializer,
    get_preconditioner,
    list_adapters,
    list_chains,
    list_initializers,
    list_preconditioners,
    list_statistics,
    load_plugins,
    register_adapter,
    register_chain,
    register_initializer,
    register_preconditioner,
    register_statistic,
)
from .adapters import Adapter, LoRALayer
from .init import InitResult, Initializer, LayerContext
from .optim import Preconditioner
from .config import LoRAConfig
from .inject import adapted_layers, default_loss, inject
from .model_ops import merge, rank_allocation, summary, trainable_parameters, unload, unmerge
from .io import AdapterFileError, load_adapter, save_adapter
from .qlora import quantization_errors, quantize_base
from .chains import Chain, ChainRun, start_chain
from . import optim, peft, quant, theory  # noqa: E402  (subpackages; none of them imports peft the library)
from .registry import _lowrank_imported

_lowrank_imported()  # last: the built-in packages' modules (they may import the names above), then plug-ins
del _lowrank_imported

__all__ = [
    "__version__",
    "Adapter", "LoRALayer", "Initializer", "InitResult", "LayerContext", "Preconditioner", "LoRAConfig",
    "AdapterFileError",
    "register_initializer", "get_initializer", "list_initializers",
    "register_preconditioner", "get_preconditioner", "list_preconditioners",
    "register_adapter", "get_adapter", "list_adapters", "register_statistic", "list_statistics", "load_plugins",
    "inject", "adapted_layers", "default_loss", "merge", "unmerge", "unload",
    "trainable_parameters", "summary", "rank_allocation", "save_adapter", "load_adapter",
    "quantize_base", "quantization_errors",
    "Chain", "ChainRun", "start_chain", "register_chain", "get_chain", "list_chains",
]
