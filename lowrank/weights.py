"""The base weights: how a supported base layer stores its weight (:func:`weight_view` / :func:`weight_shape` /
:func:`set_weight` as ``(d_out, d_in)``, whatever the layout: ``nn.Linear``, GPT-2's ``Conv1D``, a 4-bit
``Linear4bit``, an FSDP2 shard), the one formula for an offset base ``W = W0 - s B A``, an adapted layer's offset record
(:func:`apply_offset`, :func:`rebuild_offset`, :func:`original_weight`) and the journal that puts back everything
a commit changed when it fails.

Offsets are computed in float32 (float64 for float64 weights), one fused product per block of rows (no
``(m, n)`` temporary), and cast to the weight's dtype; a result that is not finite is an error before anything
is written. :class:`Journal` records each change a commit makes (modules swapped in, weights replaced or
overwritten in place, tensors overwritten, ``requires_grad`` flags) and :meth:`Journal.rollback` undoes them in
reverse order: ``lowrank.inject`` / ``load_adapter`` (through ``lowrank.plan.commit``) and
``lowrank.peft.initialize`` share it.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .quant import dequantized, is_4bit, quantize, relative_error, set_param, stored_dtype
from .sharding import gather, is_dtensor, local_rows, restore_rows, write_rows
from . import distributed as dist_helpers

try:  # transformers is a dependency, but keep the layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

SUPPORTED_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2) stores its weight as ``(d_in, d_out)``."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported base module (a 4-bit layer stores its weight packed)."""
    if is_4bit(module):
        return module.out_features, module.in_features
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


def weight_view(module: nn.Module) -> torch.Tensor:
    """The base weight as a ``(d_out, d_in)`` view (no copy); for a 4-bit layer, ``deq(Q)`` (a new tensor:
    writing into it does not change the layer, :func:`set_weight` does)."""
    if is_4bit(module):
        return dequantized(module)
    w = module.weight
    if is_dtensor(w):  # FSDP2: the whole weight, gathered (a collective; lowrank.sharding)
        w = gather(w)
    return w.T if is_conv1d(module) else w


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the base weight holds its values in (a 4-bit layer's: the dtype it was quantized from)."""
    return stored_dtype(module)


def set_weight(module: nn.Module, w_mn: torch.Tensor) -> torch.Tensor:
    """Store ``w_mn`` (``(d_out, d_in)``) as the module's weight data, in its dtype and layout; a 4-bit layer
    gets ``quant(w_mn)`` with its own settings, and records the relative quantization error
    ``||w_mn - deq(quant(w_mn))||_F / ||w_mn||_F`` as ``module.quantization_error``.

    Returns the previous data tensor (a 4-bit layer's previous ``Params4bit``), so a caller can put it back bit
    for bit with :func:`restore_weight`.
    """
    if is_4bit(module):
        old, new = module.weight, quantize(module, w_mn)
        set_param(module, new)
        module.quantization_error = relative_error(w_mn, module)
        return old
    new = w_mn.T if is_conv1d(module) else w_mn
    if is_dtensor(module.weight):  # FSDP2: each rank writes its own rows into its shard, in place
        return write_rows(module.weight, new)
    old = module.weight.data
    module.weight.data = new.to(dtype=old.dtype, device=old.device).contiguous()
    return old


def restore_weight(module: nn.Module, old: torch.Tensor) -> None:
    """Undo :func:`set_weight` with what it returned."""
    if is_4bit(module):
        set_param(module, old)
        module.__dict__.pop("quantization_error", None)
    elif is_dtensor(module.weight):
        restore_rows(module.weight, old)
    else:
        module.weight.data = old



_IN_PLACE = contextvars.ContextVar("lowrank_offsets_in_place", default=False)


@contextmanager
def offsets_in_place():
    """Within this block :func:`offset_weight` overwrites the weight's storage instead of replacing it, and
    returns ``None``: no copy of the old weight is kept (``inject(..., rollback="recompute")``)."""
    token = _IN_PLACE.set(True)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


OFFSET_BLOCK = 1 << 22
"""Elements per row block of :func:`offset_value` (16 MiB of float32): the transient memory of an offset."""


def _offset_blocks(module: nn.Module, w0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """``(rows, w0[rows] - s B[rows] A)`` block by block: float32 (float64 for float64 weights), one fused
    product per block (no ``(m, n)`` temporaries), cast to the weight's dtype."""
    dt, out_dt = torch.promote_types(weight_dtype(module), torch.float32), weight_dtype(module)
    A = A.to(dt)
    step = max(1, OFFSET_BLOCK // max(1, w0.shape[1]))
    for i in range(0, w0.shape[0], step):
        rows = slice(i, i + step)
        yield rows, torch.addmm(w0[rows].to(dt), B[rows].to(dt), A, alpha=-scaling).to(out_dt)


def offset_value(module: nn.Module, w0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``w0 - s B A`` as :func:`offset_weight` writes it: float32 (float64 for float64 weights), one fused product
    per block of rows (:data:`OFFSET_BLOCK`), then cast to the weight's dtype; ``(d_out, d_in)``."""
    out = torch.empty(w0.shape, dtype=weight_dtype(module), device=w0.device)
    for rows, block in _offset_blocks(module, w0, A, B, scaling):
        out[rows] = block
    return out


def offset_is_finite(module: nn.Module, w0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> bool:
    """Whether :func:`offset_value` is finite, block by block: no ``(m, n)`` tensor is formed."""
    return all(bool(torch.isfinite(block).all()) for _, block in _offset_blocks(module, w0, A, B, scaling))


@torch.no_grad()
def offset_weight(module: nn.Module, w0: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  scaling: float) -> torch.Tensor | None:
    """Set ``module``'s weight to ``w0 - s B A`` (:func:`offset_value`); return the previous data for rollback.
    A result that is not finite is an error and the weight is left as it was. Under :func:`offsets_in_place`
    the storage is overwritten block by block once every block is known to be finite (no ``(m, n)``
    temporary) and ``None`` is returned. A 4-bit layer gets ``quant(w0 - s B A)`` (never in place: its previous
    ``Params4bit``, an eighth of a float32 copy, is returned), its quantization error noted by :func:`set_weight`."""
    if is_dtensor(module.weight):
        return _offset_shard(module, w0, A, B, scaling)
    if _IN_PLACE.get() and not is_4bit(module):
        if not offset_is_finite(module, w0, A, B, scaling):
            raise FloatingPointError(f"the offset base weight W0 - s B A is not finite (the factors are too large "
                                     f"for the weight's dtype {weight_dtype(module)}); the model was not changed. Use "
                                     "smaller factors")
        w = weight_view(module)
        for rows, block in _offset_blocks(module, w0, A, B, scaling):  # w0 may be w: each block is read first
            w[rows] = block
        return None
    value = offset_value(module, w0, A, B, scaling)
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"the offset base weight W0 - s B A is not finite (the factors are too large for the "
                                 f"weight's dtype {value.dtype}); the model was not changed. Use smaller factors")
    return set_weight(module, value)


def _offset_shard(module: nn.Module, w0: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                  scaling: float) -> torch.Tensor | None:
    """FSDP2: this rank's rows of ``w0 - s B A`` (``w0=None``: the current shard), written into its shard in place,
    by the same blocks whether ``w0`` is the current weight (inject) or a gathered original (load), so both give
    the same bits; the previous rows are returned (``None`` under :func:`offsets_in_place`: nothing kept). The
    finite check is agreed across the ranks, so a failure is raised on every rank."""
    local, rows = module.weight.to_local(), local_rows(module.weight)
    src, B_rows = (local if w0 is None else w0[rows]), B[rows]
    finite = torch.tensor([float(offset_is_finite(module, src, A, B_rows, scaling))])
    dist_helpers.all_reduce_(finite, op=torch.distributed.ReduceOp.MIN)
    if not bool(finite.item()):
        raise FloatingPointError(f"the offset base weight W0 - s B A is not finite on some rank's shard (the factors "
                                 f"are too large for the weight's dtype {weight_dtype(module)}); the model was not "
                                 "changed. Use smaller factors")
    old = None if _IN_PLACE.get() else local.clone()
    for r, block in _offset_blocks(module, src, A, B_rows, scaling):  # src may be local: each block is read first
        local[r] = block
    return old


@torch.no_grad()
def restore_shard_in_place(layer: nn.Module) -> None:
    """Undo an in-place offset of an FSDP2 shard: ``W[rows] + s B0[rows] A0``."""
    local, rows = layer.base_layer.weight.to_local(), local_rows(layer.base_layer.weight)
    dt = torch.promote_types(local.dtype, torch.float32)
    local.copy_(torch.addmm(local.to(dt), layer.B0[rows].to(dt), layer.A0.to(dt), alpha=layer.scaling))


@torch.no_grad()
def apply_offset(layer: nn.Module, pair: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Record ``layer``'s current factors (or ``pair``, cast to the factors' dtype) as its ``A0``, ``B0`` and set
    ``W = W0 - s B0 A0``.

    The product is formed in float32 (float64 for float64 weights) from the factors *as stored* (their dtype),
    so :func:`lowrank.load_adapter` recomputes the same offset bit for bit. Returns the previous weight data, for
    rollback (``None`` under :func:`offsets_in_place`)."""
    pair = pair if pair is not None else layer.factors()
    if pair is None:
        raise ValueError(f"the {layer.registry_name!r} adapter trains no (A, B) pair, so its base cannot be offset "
                         "(W = W0 - s B0 A0); use an initializer that does not offset it")
    layer.A0, layer.B0 = pair[0].detach().clone(), pair[1].detach().clone()
    current = None if is_dtensor(layer.base_layer.weight) else layer.base_weight()  # a shard: no gather
    return rebuild_offset(layer, current)


@torch.no_grad()
def extend_offset(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor | None:
    """``W <- W - s B A`` and the offset record grows by the pair: ``A0 <- [A0; A]``, ``B0 <- [B0, B]`` (so
    ``W = W0 - s B0 A0`` still holds, at rank ``R0 + k``). A chain (``lowrank.chains``) folds a finished link
    into the base with ``(A, -B)`` and offsets the next link's initial factors with ``(A0', B0')``. The product is
    formed as :func:`offset_weight` forms it (float32, one block of rows at a time); an FSDP2 shard is updated in
    place from its current rows. Returns the previous weight data, for rollback."""
    A = A.detach().to(layer.A.dtype)
    B = B.detach().to(layer.B.dtype)
    current = None if is_dtensor(layer.base_layer.weight) else layer.base_weight()
    old = offset_weight(layer.base_layer, current, A, B, layer.scaling)
    if layer.A0 is None:
        layer.A0, layer.B0 = A.clone(), B.clone()
    else:
        layer.A0, layer.B0 = torch.cat([layer.A0, A.to(layer.A0)]), torch.cat([layer.B0, B.to(layer.B0)], dim=1)
    return old


@torch.no_grad()
def rebuild_offset(layer: nn.Module, w0: torch.Tensor | None) -> torch.Tensor | None:
    """Set ``layer``'s base to ``w0 - s B0 A0`` from an original weight ``w0 (d_out, d_in)`` (``None``: the current
    FSDP2 shard); returns the old data."""
    return offset_weight(layer.base_layer, w0, layer.A0, layer.B0, layer.scaling)


@torch.no_grad()
def original_weight(layer: nn.Module) -> torch.Tensor:
    """``W0`` of an adapted layer: ``W + s B0 A0`` when its base was offset, else ``W``, ``(d_out, d_in)`` in the
    layer's compute dtype (float32/64; exact up to one rounding of the base dtype)."""
    dt = layer.compute_dtype
    w = layer.base_weight().to(dt)
    return w + layer.scaling * (layer.B0.to(dt) @ layer.A0.to(dt)) if layer.offset else w


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at dotted ``name`` in ``model``; return the module it replaces."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


class Journal:
    """The changes of one commit, to undo on failure (:meth:`rollback`, newest first). Starts by noting every
    parameter's ``requires_grad`` flag."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.undo: list[Callable[[], None]] = []

    def swap(self, name: str, module: nn.Module) -> None:
        """Put ``module`` at ``name``, noting the one it replaces."""
        old = set_module(self.model, name, module)
        self.undo.append(lambda: set_module(self.model, name, old))

    def replaced_weight(self, module: nn.Module, old: torch.Tensor | None) -> None:
        """``module``'s weight data was replaced; ``old`` is the previous data (``None``: nothing to note)."""
        if old is not None:
            self.undo.append(lambda: restore_weight(module, old))

    def overwritten(self, restore: Callable[[], None]) -> None:
        """A weight was overwritten in place (no copy kept); ``restore`` recomputes it (e.g. ``W + s B0 A0``)."""
        self.undo.append(restore)

    @torch.no_grad()
    def copy_into(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """``tensor.copy_(value)``, keeping a copy of what it held."""
        kept = tensor.detach().clone()
        tensor.copy_(value)
        self.undo.append(lambda: tensor.data.copy_(kept))

    @torch.no_grad()
    def rollback(self) -> None:
        for undo in reversed(self.undo):
            undo()
        self.undo = []
        for p, flag in self.flags:
            p.requires_grad_(flag)
