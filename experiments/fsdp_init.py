"""A complete FSDP2 run: shard the base, inject a data-driven init on every rank, train, save the adapter.

    torchrun --nproc-per-node 2 -m experiments.fsdp_init                 # CPU, gloo, a random Llama
    torchrun --nproc-per-node 2 -m experiments.fsdp_init --model smollm2 # the offline SmolLM2-135M
    python -m experiments.fsdp_init                                      # one process, the same steps (no sharding)

Every rank prints its share of the base (bytes of its parameter shards), the extra peak memory (RSS above the
level before; on CUDA peak allocated bytes) of the init and of the training steps after it, and the adapters'
checksum after training (equal on every rank). ``--floor`` measures instead the statistics pass alone under the
same sharding (forward + backward over the init batches with the gradient taps, nothing kept: what any data-driven
init pays before lowrank keeps anything) and stops; run it as its own process (a measurement earlier in the same
process lowers the next one's RSS peak, as freed memory stays resident); ``--vocab 8000 --batch-size 2`` with ``--hidden 4096 --layers 6`` is
``bench_init --large 4096,11008,6``'s model and batches (there in one process). ``--meta --dtype bfloat16`` builds
a model larger than one process's share of memory the way such a model must be built (on the meta device, then
each rank allocates its own shard: ``--layers 32 --vocab 32000`` is Llama-2 7B's shape); ``--shard-embeddings``
makes the embedding and the output layer FSDP units of their own, as large-model recipes do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import lowrank

from lowrank_ablation.memory import PeakMemory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(name: str, hidden: int, layers: int, vocab: int, dtype: torch.dtype = torch.float32, meta: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        from lowrank_ablation.data.smollm2 import smollm2_path

        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                      vocab_size=vocab)
    if meta:  # no storage yet: each rank allocates its own shard after fully_shard (see _materialize)
        with torch.device("meta"):
            return LlamaForCausalLM(cfg).to(dtype)
    return LlamaForCausalLM(cfg).to(dtype)


@torch.no_grad()
def _materialize(model, rank: int) -> None:
    """Allocate a meta-built model's parameters (after ``fully_shard``: this rank's rows only) and fill them with
    random values (weights N(0, 0.02), norms 1; a rank-dependent stream, so the global model differs from one
    process's: use it for memory, not for comparing factors); the rotary tables are rebuilt."""
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(1000 + rank)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.dim() > 1:
            local.copy_(torch.randn(local.shape, generator=g).mul_(0.02))
        else:
            local.fill_(1.0)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(model.config)


def _floor(model, batches, rank: int) -> int:
    """Extra peak memory of the statistics pass alone: hooks, graph, backward, nothing accumulated."""
    from lowrank.inject import find_targets
    from lowrank.init.collect import collect_statistics

    from .bench_init.large import _NullSink

    modules = {t.name: t.module for t in find_targets(model, lowrank.LoRAConfig(rank=rank, targets=TARGETS))}
    with PeakMemory() as mem:
        collect_statistics(model, modules, batches, None, ("gradient",), progress=False,
                           gradient_sink=_NullSink(modules))
    return mem.extra


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["random", "smollm2"], default="random")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--floor", action="store_true", help="measure the statistics pass alone, then stop")
    p.add_argument("--batches", type=int, default=4, help="init batches in all (split across the ranks)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rollback", choices=["auto", "exact", "recompute"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the base's dtype")
    p.add_argument("--meta", action="store_true",
                   help="build the random model on the meta device and allocate only each rank's shard (a model "
                        "larger than one process's memory)")
    p.add_argument("--shard-embeddings", action="store_true",
                   help="the embedding and the output layer as FSDP units of their own (else the root's, gathered "
                        "from the forward to the backward)")
    p.add_argument("--replicated-sketch", action="store_true",
                   help="keep every layer's sketch state on every rank (init_options shard_state=False; default: "
                        "split across the ranks on a sharded model)")
    p.add_argument("--out", default="/tmp/lowrank-fsdp-adapter")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if args.meta and args.model != "random":
        p.error("--meta builds the random model only")
    if args.shard_embeddings and args.model != "random":
        p.error("--shard-embeddings needs untied embeddings: the random model only")
    model = _model(args.model, args.hidden, args.layers, args.vocab, getattr(torch, args.dtype), args.meta).train()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        if args.shard_embeddings:
            fully_shard(model.model.embed_tokens, mesh=mesh)
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if args.meta:
        _materialize(model, rank)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    data = [{"input_ids": (ids := torch.randint(0, vocab, (args.batch_size, 64), generator=g)), "labels": ids}
            for _ in range(args.batches + args.steps * world)]
    base = sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in model.parameters())
    if args.floor:
        floor = _floor(model, data[:args.batches][rank::world], args.rank)
        sys.stdout.write(f"rank {rank}/{world}: base share {base / 2**20:.0f} MiB, statistics pass alone "
                         f"{floor / 2**20:.0f} MiB\n")  # one write: the ranks' lines stay whole in a shared pipe
        sys.stdout.flush()
        if world > 1:
            dist.destroy_process_group()
        return
    cfg = lowrank.LoRAConfig(rank=args.rank, scaling="rslora", targets=TARGETS, init="lora_ga",
                             init_options={"progress": False, "estimator": "sketch",
                                           **({"shard_state": False} if args.replicated_sketch else {})})
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        lowrank.inject(model, cfg, data=data[:args.batches][rank::world], progress=False, rollback=args.rollback)
        seconds = time.perf_counter() - t0
    opt = lowrank.optim.PreconditionedOptimizer(model, "adamw", lr=1e-4)
    with PeakMemory() as train_mem:
        for batch in data[args.batches:][rank::world][:args.steps]:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    checksum = sum(float(p.detach().double().sum()) for _, layer in lowrank.adapted_layers(model)
                   for p in layer.adapter_parameters().values())
    mib = 2 ** 20
    sys.stdout.write(f"rank {rank}/{world} ({args.rollback} rollback): base share {base / mib:.0f} MiB, init "
                     f"{seconds:.1f} s, init extra peak {mem.extra / mib:.0f} MiB, training steps extra peak "
                     f"{train_mem.extra / mib:.0f} MiB, adapter checksum {checksum:.10e}\n")  # one write: whole lines
    sys.stdout.flush()
    if rank == 0:
        lowrank.save_adapter(model, args.out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
