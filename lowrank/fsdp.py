"""Training lowrank adapters on an FSDP2-sharded base (``torch.distributed.fsdp.fully_shard``).

The order a model too large for one device forces, on every rank::

    for block in model.model.layers:
        fully_shard(block, mesh=mesh)        # the base: each rank holds its rows of every weight
    fully_shard(model, mesh=mesh)
    lowrank.inject(model, cfg, data=rank_batches)   # statistics through FSDP's own forward/backward, all-reduced;
                                                    # offsets written into each rank's shard (lowrank.sharding)
    # inject has arranged the adapters' gradient averaging (replicate_adapters, below): nothing to call
    opt = lowrank.optim.PreconditionedOptimizer(model, "adamw", lr=...)
    for batch in rank_batches: loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()

**Replicated adapters.** The adapter factors are added after ``fully_shard``, so FSDP does not manage them: every
rank holds all of them (``r (m + n)`` per layer, well under 1% of a 7B model's weights at r = 16) and
:func:`replicate_adapters` (which ``inject`` and ``load_adapter`` call on a sharded base) averages their gradients
across ranks as each is accumulated, which keeps them and the
optimizer's state bitwise identical on every rank (each rank applies the same averaged gradient). Sharding them
as well would save that fraction of memory at the price of an FSDP group per adapter; it is not done.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .distributed import average_gradients, replicated  # noqa: F401  (public here too)
from .plan import adapted_layers


def replicate_adapters(model: nn.Module, process_group=None) -> list:
    """Average every trainable adapter parameter's gradient over the ranks, right after it is accumulated in each
    backward (``register_post_accumulate_grad_hook``); returns the hook handles (``handle.remove()`` undoes it).

    :func:`lowrank.inject` and :func:`lowrank.load_adapter` call it themselves on an FSDP2-sharded base in an
    initialized process group (over the weights' device mesh, :func:`lowrank.distributed.average_over_mesh`), so
    a training step after them keeps the ranks identical. Calling it again is idempotent (one hook per
    parameter); with another ``process_group`` it replaces the hooks' group. Needs an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("replicate_adapters needs torch.distributed: call dist.init_process_group first")
    params = [p for _, layer in adapted_layers(model) for p in layer.adapter_parameters().values() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable lowrank adapters; call lowrank.inject(model, "
                         "config) first")
    return average_gradients(params, process_group)
