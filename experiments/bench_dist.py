"""Distributed LoRA-GA initialization: 2 processes (gloo, CPU) vs 1 process on the same total data.

    python -m experiments.bench_dist [--batches 8] [--batch-size 32] [--repeats 3]

The offline MiniLM, LoRA-GA r=8 on query/key/value/dense. One process estimates the gradient
on all ``--batches`` batches with every CPU thread; two processes (one thread each, gloo) each
take half and all-reduce (``lowrank.distributed``). Timed: ``lowrank.inject`` only (model and
data loading excluded), rank 0's wall time after a barrier. Checks that both ranks got bitwise
identical factors and that they match the single process's to float tolerance (projections:
singular vectors have arbitrary signs). On 2 CPU cores expect little speed-up: the point is that
it is correct and that the same code scales on real clusters (``torchrun``, NCCL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lowrank
from lowrank_ablation.data.batches import classification_batches
from lowrank_ablation.data.minilm import load_minilm_classifier
from lowrank_ablation.data.wordnet import supersense_splits

TARGETS = ["query", "key", "value", "dense"]


def setup(n_batches: int, batch_size: int):
    from transformers.utils import logging

    logging.set_verbosity_error()
    train, _ = supersense_splits(n_train=n_batches * batch_size * 2, n_eval=100)
    n = train.features["label"].num_classes
    torch.manual_seed(0)
    model, tok = load_minilm_classifier(n)
    data = list(classification_batches(train, tok, batch_size, shuffle=True, seed=1))[:n_batches]
    return model.eval(), data


def init(model, data) -> float:
    cfg = lowrank.LoRAConfig(rank=8, alpha=16, scaling="rslora", targets=TARGETS, init="lora_ga",
                             init_options={"progress": False})
    t0 = time.perf_counter()
    lowrank.inject(model, cfg, data=data, progress=False)
    return time.perf_counter() - t0


def factors(model):
    return {n: (layer.A.detach().clone(), layer.B.detach().clone()) for n, layer in lowrank.adapted_layers(model)}


def _worker(rank, world, init_file, args, out):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, data = setup(args.batches, args.batch_size)
        dist.barrier()
        seconds = init(model, data[rank::world])
        torch.save({"seconds": seconds, "factors": factors(model)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
    print(f"# bench_dist: lowrank {lowrank.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.batches} batches x {args.batch_size}, world {args.world}")
    single_t, multi_t, same, err = [], [], True, 0.0
    for _ in range(args.repeats):
        torch.set_num_threads(os.cpu_count() or 1)
        model, data = setup(args.batches, args.batch_size)
        single_t.append(init(model, data))
        ref = factors(model)
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(args.world, os.path.join(tmp, "pg"), args, tmp), nprocs=args.world, join=True)
            ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(args.world)]
        multi_t.append(ranks[0]["seconds"])
        same &= all(torch.equal(ranks[0]["factors"][n][i], r["factors"][n][i])
                    for r in ranks[1:] for n in ref for i in (0, 1))
        err = max(err, max(max(((a.T @ a) - (ra.T @ ra)).abs().max().item(), ((b @ b.T) - (rb @ rb.T)).abs().max().item())
                           for n, (ra, rb) in ref.items() for a, b in [ranks[0]["factors"][n]]))
    s, m = statistics.median(single_t), statistics.median(multi_t)
    print("| | init time (s) |\n|---|---|")
    print(f"| 1 process, {args.batches} batches | {s:.2f} |")
    print(f"| {args.world} processes, {args.batches // args.world} batches each | {m:.2f} |")
    print(f"time ratio {args.world}-process / 1-process: {m / s:.2f}")
    print(f"factors bitwise identical across ranks: {same}; max |projection difference| vs 1 process: {err:.2e}")


if __name__ == "__main__":
    main()
