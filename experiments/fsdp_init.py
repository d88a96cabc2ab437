"""A complete FSDP2 run: shard the base, inject a data-driven init on every rank, train, save the adapter.

    torchrun --nproc-per-node 2 -m experiments.fsdp_init                 # CPU, gloo, a random Llama
    torchrun --nproc-per-node 2 -m experiments.fsdp_init --model smollm2 # the offline SmolLM2-135M
    python -m experiments.fsdp_init                                      # one process, the same steps (no sharding)

Every rank prints its extra peak memory (RSS above the level before ``inject``; on CUDA peak allocated bytes) of
the init, and the adapters' checksum after training (equal on every rank).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import lowrank
import lowrank.fsdp

from .ablation.memory import PeakMemory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(name: str, hidden: int, layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        from experiments.data.smollm2 import smollm2_path

        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                      vocab_size=4096)
    return LlamaForCausalLM(cfg)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["random", "smollm2"], default="random")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="init batches in all (split across the ranks)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rollback", choices=["exact", "recompute"], default="exact")
    p.add_argument("--out", default="/tmp/lowrank-fsdp-adapter")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = _model(args.model, args.hidden, args.layers).train()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    data = [{"input_ids": (ids := torch.randint(0, vocab, (4, 64), generator=g)), "labels": ids}
            for _ in range(args.batches + args.steps * world)]
    cfg = lowrank.LoRAConfig(rank=args.rank, scaling="rslora", targets=TARGETS, init="lora_ga",
                             init_options={"progress": False, "estimator": "sketch"})
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        lowrank.inject(model, cfg, data=data[:args.batches][rank::world], progress=False, rollback=args.rollback)
        seconds = time.perf_counter() - t0
    if world > 1:
        lowrank.fsdp.replicate_adapters(model)
    opt = lowrank.optim.PreconditionedOptimizer(model, "adamw", lr=1e-4)
    for batch in data[args.batches:][rank::world][:args.steps]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    checksum = sum(float(p.detach().double().sum()) for _, layer in lowrank.adapted_layers(model)
                   for p in layer.adapter_parameters().values())
    print(f"rank {rank}/{world} ({args.rollback} rollback): init {seconds:.1f} s, extra peak memory {mem.extra / 2**20:.0f} MiB, "
          f"adapter checksum {checksum:.10e}", flush=True)
    if rank == 0:
        lowrank.save_adapter(model, args.out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
