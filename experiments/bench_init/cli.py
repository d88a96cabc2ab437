"""Initialization benchmark: lowrank vs PEFT on the offline MiniLM and real WordNet batches.

    python -m experiments.bench_init [--repeats 3] [--rank 8] [--batches 8] [--batch-size 32]

Three measurements, each side by side with PEFT in one run (PEFT version printed):

1. LoRA-GA init: wall time and extra peak memory of the whole init phase (gradient estimation
   + SVD + adapter creation), lowrank ``inject(init="lora_ga")`` vs PEFT ``preprocess_loraga`` +
   ``get_peft_model(init_lora_weights="lora_ga")`` on the same batches. Each repeat runs in a
   fresh subprocess, alternating lowrank/PEFT; memory is the peak RSS (sampled every 2 ms)
   above the RSS before the init (on CUDA: peak allocated bytes). Ratios lowrank/PEFT.
2. Randomized PiSSA vs PEFT ``pissa_niter_4``: relative error of the rank-r part
   ``||s B A - W_r||_F / ||W_r||_F`` against the exact truncation (full SVD), the
   Eckart-Young suboptimality ``||W0 - s B A||_F / ||W0 - W_r||_F - 1``, and wall time.
3. First-step alignment on the same gradient ``G``: ``sin`` of the angle between the first
   LoRA step ``s^2 (B B^T G + G A^T A)`` and ``G_2r`` (0 = exactly proportional, LoRA-GA's
   theorem), for lowrank's and PEFT's ``lora_ga``.

4. EVA vs PEFT's EVA (``--only eva``): the init phase (statistics + SVD + adapters) as each library is
   used, on the same batches (lowrank: one pass; PEFT: its incremental PCA, cycling until the
   components converge at ``tau = 0.99``), time and extra peak memory in fresh subprocesses, ratios
   lowrank/PEFT. Then both on the same rows (the batches as one, where PEFT's PCA fits exactly
   those rows): the rank allocation, and the principal angles of each layer's ``A`` to the other
   library's and to the exact centred SVD (float64). Label masking is off in PEFT (a classification
   batch has no per-token labels).
6. Sketched LoRA-GA (``--only sketch``): for 1 to 4 passes (default 3), and with ``krylov=True`` at 3
   and 4, per layer the first step's sine to ``zeta G_2r`` and its relative error's excess over the
   Eckart-Young floor, on the dense estimate's ``G`` (same batches), median / max; and the init time
   against the dense estimator. ``--draws D``: instead, the default sketch (and 4 passes, and 3 with
   ``krylov=True``) on ``D`` held-out, disjoint draws of the batches (shuffle seed 2; the table above is on
   seed 1), the excess's median per draw and over every (draw, layer).
7. Large model (``--large H,I,L``, e.g. ``2048,5632,10``): a Llama built from a ``transformers`` config
   with random weights (hidden ``H``, intermediate ``I``, ``L`` layers, all seven projections, r=8,
   2 batches of 2 x 64 tokens), each arm in a fresh process: LoRA-GA with the default estimator and
   SVD, with ``offload=True``, with ``estimator="sketch"``, each of the two with ``rollback="recompute"``
   (offsets written in place), optionally ``svd="full"`` (``--large-full``), the statistics pass alone
   (hooks, forward + backward, nothing kept: the floor under any estimator),
   and PEFT's ``preprocess_loraga`` + ``get_peft_model``: time and extra peak memory, ratios to PEFT,
   and the default's profile (gradient estimate / factorizations / the rest). On CUDA when present.
   ``--mmap-threshold BYTES`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in the arm processes, so that the
   resident size follows the live tensors (on CUDA the measure is allocated bytes in any case);
   ``--large-arms`` picks arms (with ``floor`` and ``peft``); ``--large-weights`` adds PiSSA, MiLoRA and
   OLoRA with both rollbacks.
5. The statistics pass (``--only stats``): a forward-only statistic (``covariance``, ``input_svd``)
   against the gradient estimate on the same batches and layers, in one process, median time.

Dropout is switched off in the model config so that PEFT (which estimates in train mode) and
lowrank (eval mode) see the same gradient."""

from __future__ import annotations

import argparse
import os

import torch

import lowrank

from .alignment import bench_alignment
from .eva import bench_eva
from .harness import get_batches
from .large import bench_large
from .lora_ga import bench_lora_ga_init
from .pissa import bench_pissa
from .sketch import bench_sketch, bench_sketch_draws
from .statistics_pass import bench_stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--draws", type=int, default=0, help="--only sketch: held-out draws of the batches instead")
    p.add_argument("--only", choices=["lora_ga", "pissa", "alignment", "eva", "stats", "sketch"], default=None)
    p.add_argument("--large", default=None, metavar="H,I,L",
                   help="only the large-model benchmark: a random Llama (hidden,intermediate,layers), e.g. 2048,5632,10")
    p.add_argument("--large-full", action="store_true", help="add LoRA-GA with svd='full' to --large")
    p.add_argument("--large-weights", action="store_true", help="add PiSSA, MiLoRA, OLoRA's memory to --large")
    p.add_argument("--large-arms", default=None, metavar="A,B,...",
                   help="--large: only these arms of the table (with 'floor' and 'peft'); '' for none")
    p.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="--large: set MALLOC_MMAP_THRESHOLD_ in the arm processes (glibc returns freed blocks of "
                        "this size and above to the system)")
    args = p.parse_args(argv)
    import peft

    if args.large:
        print(f"# bench_init --large: lowrank {lowrank.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs")
        bench_large(args)
        return

    print(f"# bench_init: lowrank {lowrank.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    if args.only == "sketch" and args.draws:
        bench_sketch_draws(args)
        return
    n, batches = get_batches(args.batches, args.batch_size)
    if args.only in (None, "lora_ga"):
        bench_lora_ga_init(args)
    if args.only in (None, "pissa"):
        bench_pissa(args, n)
    if args.only in (None, "alignment"):
        bench_alignment(args, n, batches)
    if args.only in (None, "eva"):
        bench_eva(args, n, batches)
    if args.only in (None, "stats"):
        bench_stats(args, n, batches)
    if args.only in (None, "sketch"):
        bench_sketch(args, n, batches)
