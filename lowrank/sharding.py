"""Base weights that FSDP2 (``torch.distributed.fsdp.fully_shard``) holds as ``DTensor`` shards.

FSDP2 shards every parameter on its first dimension: rank ``k`` of a mesh of ``w`` holds rows ``[o_k, o_k + n_k)``
of each ``(d_out, d_in)`` weight (``torch.chunk``'s split). lowrank reads such a weight whole only per layer and
only when an initializer or a merge needs it (:func:`gather`, a collective: every rank calls it for the same layer
in the same order), and writes it shard by shard (:func:`write_rows`: each rank copies its own rows, in place,
into FSDP's sharded storage), so the model is never materialized on one rank. Other placements (a weight split on
its second dimension, FSDP1 flat parameters, DeepSpeed ZeRO-3) are refused by ``lowrank.plan``.
"""

from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (checked by name: no import when it is not)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local") and hasattr(t, "placements")


def row_sharded(t) -> bool:
    """Whether ``t``'s placements are FSDP2's: every mesh dimension ``Shard(0)`` or ``Replicate()`` (HSDP)."""
    from torch.distributed.tensor import Replicate, Shard

    return all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in t.placements)


def local_rows(t) -> slice:
    """The rows of the global tensor that this rank's shard of ``t`` holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return slice(offset[0], offset[0] + shape[0])


def gather(t) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather: call it on every rank, in the same order)."""
    return t.full_tensor()


@torch.no_grad()
def write_rows(t, full: torch.Tensor) -> torch.Tensor:
    """Copy this rank's rows of ``full`` (the global tensor's values) into ``t``'s shard, in place; returns a copy of
    what the shard held (for :func:`restore_rows`)."""
    local = t.to_local()
    old = local.clone()
    local.copy_(full[local_rows(t)].to(dtype=local.dtype, device=local.device))
    return old


@torch.no_grad()
def restore_rows(t, old: torch.Tensor) -> None:
    """Undo :func:`write_rows`."""
    t.to_local().copy_(old)
