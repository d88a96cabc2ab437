"""4-bit (bitsandbytes NF4/FP4 ``Linear4bit``) base layers: read, write and measure their weights.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) trains LoRA on a base whose weights are stored in 4 bits,
``W = deq(Q)``. lowrank adapts such a layer like an ``nn.Linear`` whose weight is ``deq(Q)``:

- statistics passes (gradients, input moments) run through the quantized forward as it is;
- weight-based initializers (PiSSA, MiLoRA, OLoRA, CorDA, LoRA-XS) factor ``W0 = deq(Q0)`` (float32 copy);
- an offset initializer quantizes the residual, ``Q = quant(W0 - s B0 A0)`` with the layer's own settings (block
  size, NF4/FP4, double quantization), as QPiSSA and the LoRA-GA reference do; the output then moves by the
  quantization error ``E = W0 - s B0 A0 - deq(Q)``, which :func:`lowrank.quantization_errors` reports
  (``loftq`` chooses ``B0 A0`` to make it small);
- merging puts a float ``nn.Linear`` holding ``deq(Q) + s B A`` in place of the 4-bit base (a dequantized copy;
  :meth:`~lowrank.adapters.base.Adapter.unmerge` puts the 4-bit layer back unchanged), so merging is exact and
  ``merge_and_unload`` gives a full-precision model.

``bitsandbytes`` is imported only when a model holds such a layer (``import lowrank`` never imports it):
:func:`is_4bit` looks for it in ``sys.modules``.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
import torch
from torch import nn


def _bnb():
    return sys.modules.get("bitsandbytes")


def require_bitsandbytes(what: str):
    """``bitsandbytes``, or an ImportError that says what needs it and how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"{what} needs bitsandbytes (NF4 quantization; it runs on CPU); install it with "
                          "pip install 'lowrank[quant]' (or pip install bitsandbytes)") from None
    return bitsandbytes


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (NF4 or FP4) with its weight quantized."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit) and \
        getattr(module.weight, "quant_state", None) is not None


def _unpacked(weight) -> tuple[torch.Tensor, object]:
    """The packed data and quant state in bitsandbytes' portable layout (its CPU kernels may have repacked them)."""
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # its inverse edits the state in place: give it a copy
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    return data, state


@contextmanager
def autograd_4bit(model: nn.Module):
    """Within this block every 4-bit layer of ``model`` computes through bitsandbytes' autograd path.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weight for a bf16 inference kernel at its
    first forward in eval mode without gradients, and from then on computes it with a kernel that passes no
    gradient to the layer's input (bitsandbytes 0.50): a statistics pass would see ``None`` gradients above such
    a layer. The block puts packed weights back in the portable layout (bitsandbytes' own inverse) and turns the
    repacking off; afterwards the flag is restored (the next eval forward may repack again)."""
    layers = [m for m in model.modules() if is_4bit(m)]
    flags = [(m, m.__dict__.get("support_avx512bf16_for_cpu")) for m in layers]
    try:
        for m in layers:
            if getattr(m.weight.quant_state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, m.weight.quant_state)
                m.weight.data = data
                m.quant_state = m.weight.quant_state
            m.support_avx512bf16_for_cpu = False
        yield
    finally:
        for m, flag in flags:
            if flag is None:
                m.__dict__.pop("support_avx512bf16_for_cpu", None)
            else:
                m.support_avx512bf16_for_cpu = flag


def stored_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the weight is computed in: the quantized weight's original dtype for a 4-bit layer (its
    ``quant_state.dtype``), else the weight's own."""
    if is_4bit(module):
        state = module.weight.quant_state
        return state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype
    return module.weight.dtype


def dequantized(module: nn.Module) -> torch.Tensor:
    """``deq(Q)`` of a 4-bit layer, ``(out_features, in_features)`` in :func:`stored_dtype` (a new tensor)."""
    from bitsandbytes.functional import dequantize_4bit

    data, state = _unpacked(module.weight)
    return dequantize_4bit(data, state).reshape(module.out_features, module.in_features)


def params4bit(w: torch.Tensor, module: nn.Module, *, blocksize: int, compress_statistics: bool, quant_type: str,
               quant_storage: torch.dtype = torch.uint8):
    """``w`` quantized with these settings as a frozen ``Params4bit`` of ``module``."""
    bnb = require_bitsandbytes("writing a 4-bit weight")
    from bitsandbytes.functional import quantize_4bit

    data, state = quantize_4bit(w.detach().contiguous(), blocksize=blocksize, compress_statistics=compress_statistics,
                                quant_type=quant_type, quant_storage=quant_storage)
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=blocksize,
                             compress_statistics=compress_statistics, quant_type=quant_type,
                             quant_storage=quant_storage, module=module, bnb_quantized=True)


def quantize(module: nn.Module, w: torch.Tensor):
    """``w`` (``(out, in)``) quantized with ``module``'s settings (block size, quant type, double quantization,
    storage dtype) as a new ``Params4bit``; the module is not changed."""
    old = module.weight
    _, state = _unpacked(old)
    return params4bit(w.to(dtype=state.dtype, device=old.device), module, blocksize=state.blocksize,
                      compress_statistics=old.compress_statistics, quant_type=state.quant_type,
                      quant_storage=old.quant_storage)


def relative_error(target: torch.Tensor, module: nn.Module) -> float:
    """``||target - deq(Q)||_F / ||target||_F`` for the 4-bit ``module`` made from ``target``."""
    target = target.detach().float()
    return float(torch.linalg.matrix_norm(target - dequantized(module).float())
                 / torch.linalg.matrix_norm(target).clamp_min(1e-30))


def set_param(module: nn.Module, param) -> None:
    """Make ``param`` (a ``Params4bit``) ``module``'s weight, its quant state included."""
    module.weight = param
    module.quant_state = param.quant_state


def nf4_roundtrip(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  compress_statistics: bool = False) -> torch.Tensor:
    """``deq(quant(w))`` in float32 (quantized from ``w``'s own dtype): what a 4-bit layer with these settings,
    made from ``w``, computes with."""
    require_bitsandbytes("4-bit quantization")
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    data, state = quantize_4bit(w.detach().contiguous(), blocksize=blocksize,
                                compress_statistics=compress_statistics, quant_type=quant_type)
    return dequantize_4bit(data, state).reshape(w.shape).float()


def dequantized_linear(module: nn.Module, w: torch.Tensor | None = None) -> nn.Linear:
    """A float ``nn.Linear`` with ``module``'s shape and bias holding ``w`` (default ``deq(Q)``), in the
    4-bit layer's :func:`stored_dtype` and on its device."""
    w = dequantized(module) if w is None else w
    dt = stored_dtype(module)
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                    device=w.device, dtype=dt)
    out.weight = nn.Parameter(w.detach().to(dt).clone(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.detach().to(dt).clone(), requires_grad=module.bias.requires_grad)
    out.train(module.training)
    return out
