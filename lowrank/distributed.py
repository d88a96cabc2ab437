"""``torch.distributed`` helpers: data-parallel statistics and identical initializations on every rank.

Data-driven initializers estimate ``G`` on each rank's shard; ``combine_sums`` turns the local
sums into the global mean over all ranks' batches (weighted by batch counts, float32), and
``broadcast_`` makes tensors bitwise identical on every rank (rank 0's), so ``A``, ``B`` and the
offset base weights agree exactly even if ranks' floating-point paths differ. ``agree`` makes an
error on one rank an error on all ranks instead of a hang in the next collective.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.distributed as dist


def active() -> bool:
    """A process group is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _collective(t: torch.Tensor, fn) -> None:
    dev = _comm_device(t)
    if dev == t.device and t.is_contiguous():
        fn(t)
    else:  # a strided view, or CPU-offloaded accumulators under NCCL
        tmp = t.to(dev).contiguous()
        fn(tmp)
        t.copy_(tmp.to(t.device))


def agree(error: BaseException | None, what: str = "gradient estimation") -> None:
    """Raise on every rank if any rank failed (``error`` is this rank's, or ``None``)."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    _collective(flag, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    if error is not None:
        raise error
    if flag.item():
        raise RuntimeError(f"{what} failed on another rank (rank-local error above in that rank's log); "
                           "nothing was changed here either")


def check_same(description: list, what: str) -> None:
    """Raise on every rank unless every rank passed the same ``description`` (e.g. its layers' names and
    shapes): before a sequence of all-reduces, different layers on different ranks would be summed silently
    or hang in gloo. One ``all_gather_object`` of the small description; the message names the first
    rank that differs from rank 0 and the first difference."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, description)
    for r, other in enumerate(gathered):
        if other != gathered[0]:
            first = next((i for i, (a, b) in enumerate(zip(gathered[0], other)) if a != b),
                         min(len(gathered[0]), len(other)))
            mine = gathered[0][first] if first < len(gathered[0]) else "<none>"
            theirs = other[first] if first < len(other) else "<none>"
            raise ValueError(f"{what}: rank {r} has other layers than rank 0 ({len(other)} vs {len(gathered[0])}; "
                             f"entry {first}: rank 0 {mine!r}, rank {r} {theirs!r}). Every rank must build the same "
                             "model with the same targets and ranks before a data-parallel init; nothing was changed")


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values."""
    for t in tensors:
        _collective(t, lambda x: dist.broadcast(x, src=src))


def combine_sums(sums: Iterable[torch.Tensor], count: int) -> int:
    """Sum ``sums`` (in place) and ``count`` over all ranks; rank 0's result is then broadcast, so
    every rank holds bitwise the same totals. Returns the global count."""
    sums = list(sums)
    total = torch.tensor([count], dtype=torch.int64)
    _collective(total, lambda t: dist.all_reduce(t))
    for t in sums:
        _collective(t, lambda x: dist.all_reduce(x))
    broadcast_(sums)
    return int(total.item())


def all_reduce_(t: torch.Tensor, op=None) -> None:
    """``dist.all_reduce`` in place (``op`` default sum), also for CPU tensors under NCCL."""
    _collective(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op))


def reduce_(t: torch.Tensor, dst: int) -> None:
    """``dist.reduce`` (sum) in place onto rank ``dst``; elsewhere ``t`` is left undefined (a send buffer)."""
    _collective(t, lambda x: dist.reduce(x, dst=dst))


def balance(costs: list[int], world: int) -> list[int]:
    """The rank given each item: largest cost first, each to the least-loaded rank, ties to the lower rank (and,
    among equal costs, the earlier item first); the same answer on every rank."""
    load, out = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        out[i] = min(range(world), key=lambda r: (load[r], r))
        load[out[i]] += costs[i]
    return out


_HOOK = "_lowrank_grad_average"  # on a parameter: (hook handle, process group) of its averaging hook


def average_gradients(params: Iterable[torch.Tensor], process_group=None) -> list:
    """Average each parameter's gradient over the ranks of ``process_group`` right after it is accumulated in each
    backward (``register_post_accumulate_grad_hook``); returns the hook handles. Idempotent: a parameter keeps one
    hook (another ``process_group`` replaces its hook)."""
    world = dist.get_world_size(process_group)

    def average(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, group=process_group)
        p.grad.div_(world)

    handles = []
    for p in params:
        old = getattr(p, _HOOK, None)
        if old is not None and _active(p, old[0]) and old[1] is process_group:
            handles.append(old[0])
            continue
        if old is not None:
            old[0].remove()
        handle = p.register_post_accumulate_grad_hook(average)
        setattr(p, _HOOK, (handle, process_group))
        handles.append(handle)
    return handles


def replicated(p: torch.Tensor) -> bool:
    """Whether ``p``'s gradient is averaged over the ranks by :func:`average_gradients`."""
    old = getattr(p, _HOOK, None)
    return old is not None and _active(p, old[0])


def _active(p: torch.Tensor, handle) -> bool:
    return handle.id in (getattr(p, "_post_accumulate_grad_hooks", None) or {})


def average_over_mesh(params: list[torch.Tensor], meshes: list) -> None:
    """Called by :func:`lowrank.plan.commit` on an FSDP2-sharded base (``meshes``: the device meshes of the adapted
    weights): FSDP does not manage the new adapters, so in a process group of several ranks their gradients are
    averaged (:func:`average_gradients`) over the weights' mesh when it spans every rank. A mesh over a subset of
    the ranks (e.g. FSDP inside tensor parallelism) cannot be guessed: a warning names the call to make."""
    if not meshes or not active() or not params:
        return
    mesh = meshes[0]
    if mesh.size() != world_size() or any(m != mesh for m in meshes):
        warnings.warn(f"the adapters' gradients are not averaged across ranks: the base's device mesh ({mesh}) does "
                      f"not span the {world_size()} ranks of the default group; call "
                      "lowrank.fsdp.replicate_adapters(model, process_group=<your data-parallel group>) before "
                      "training, or every rank's adapters will differ", stacklevel=4)
        return
    average_gradients(params, mesh.get_group() if mesh.ndim == 1 else None)
