"""Base weights that FSDP2 (``torch.distributed.fsdp.fully_shard``) holds as ``DTensor`` shards.

FSDP2 shards every parameter on its first dimension: rank ``k`` of a mesh of ``w`` holds rows ``[o_k, o_k + n_k)``
of each ``(d_out, d_in)`` weight (``torch.chunk``'s split). lowrank reads such a weight whole only per layer and
only when an initializer or a merge needs it (:func:`gather`, a collective: every rank calls it for the same layer
in the same order), and writes it shard by shard (:func:`write_rows`: each rank copies its own rows, in place,
into FSDP's sharded storage), so the model is never materialized on one rank. Other placements (a weight split on
its second dimension, FSDP1 flat parameters, DeepSpeed ZeRO-3) are refused by ``lowrank.plan``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def one_block_at_a_time(model) -> Iterator[int]:
    """Hold one FSDP2 block's gathered parameters at a time while lowrank's statistics pass runs through ``model``.

    FSDP2 trades memory for overlap of communication with compute in two places, and neither buys anything in a
    pass that only reads the weights: (1) in the backward of block ``i`` it prefetches block ``i-1``'s all-gather
    (its default backward prefetch), and (2) in the forward it keeps block ``i``'s all-gather buffer until block
    ``i+1``'s parameters are copied out of theirs. Here, (1) is replaced by an explicit prefetch list naming only the
    module itself (``set_modules_to_backward_prefetch([m])``: it is already gathered when its backward starts, so
    nothing is prefetched; FSDP2 has no public switch for the default), and for (2) a forward hook on each sharded
    module frees the buffer FSDP2 kept once that module's forward is done, after the same stream wait FSDP2 itself
    does before freeing it at the end of the forward. Measured on 7B-shaped blocks (``experiments/fsdp_init.py
    --hidden 4096 --layers 6 --vocab 8000 --floor``, 2 gloo ranks): the pass's extra peak per rank fell from
    2784 / 2916 MiB to 2140 / 2127 MiB (0.8 of one 772 MiB block). What is left is FSDP's own floor: a block's
    all-gather output and the parameters copied out of it exist together while the copy runs (two blocks), and
    the root's parameters stay gathered from its forward to its backward. The previous prefetch lists are put
    back and the hooks removed on exit. Yields the number of sharded modules (0 when
    ``model`` is not FSDP2-sharded, or this torch lacks the FSDP2 attributes used: then nothing is changed)."""
    import torch.distributed as dist

    saved, handles = [], []
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if not isinstance(m, FSDPModule):
                continue
            state = m._get_fsdp_state()
            if not (hasattr(state, "_states_to_backward_prefetch") and hasattr(state, "_comm_ctx")):
                continue  # another torch: leave FSDP's defaults
            saved.append((state, state._states_to_backward_prefetch))
            m.set_modules_to_backward_prefetch([m])
            handles.append(m.register_forward_hook(_free_kept_all_gather))
    try:
        yield len(saved)
    finally:
        for h in handles:
            h.remove()
        for state, old in saved:
            state._states_to_backward_prefetch = old


def _free_kept_all_gather(module, args, output) -> None:
    state = module._get_fsdp_state()
    kept = getattr(state._comm_ctx, "all_gather_state", None)
    if kept is not None:  # FSDP2's own release of it (FSDPState._root_post_forward), done one block earlier
        if kept.event is not None:
            state._device_handle.current_stream().wait_event(kept.event)
        state._comm_ctx.all_gather_state = None
