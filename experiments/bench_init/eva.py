"""4. EVA vs PEFT's EVA (``--only eva``): time, memory, rank allocation and principal angles."""

from __future__ import annotations

import os
import statistics
import time

import torch

import lowrank

from lowrank_ablation.memory import PeakMemory
from .harness import (ENCODER, _one_batch, _pairs_lowrank, _pairs_peft,
                      get_batches, load_model, run_arms, time_memory_table)


def lowrank_eva(model, batches, rank, alpha):
    cfg = lowrank.LoRAConfig(rank=rank, alpha=alpha, targets=ENCODER, init="eva", init_options={"progress": False})
    return lowrank.inject(model, cfg, data=batches, progress=False)


def peft_eva(model, batches, rank, alpha):
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=ENCODER, init_lora_weights="eva",
                          eva_config=peft.EvaConfig(rho=2.0, tau=0.99, use_label_mask=False))
    pm = peft.get_peft_model(model, cfg, low_cpu_mem_usage=True)
    peft.initialize_lora_eva_weights(pm, dataloader=batches, show_progress_bar=False)
    return pm


def _eva_worker(arm, rank, alpha, n_batches, batch_size, queue):
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    n, batches = get_batches(n_batches, batch_size)
    model, _ = load_model(n)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        {"lowrank eva": lowrank_eva, "peft eva": peft_eva}[arm](model, batches, rank, alpha)
        seconds = time.perf_counter() - t0
    queue.put((arm, seconds, mem.extra))


def _angles(A, B):
    qa, qb = torch.linalg.qr(A.double().T).Q, torch.linalg.qr(B.double().T).Q
    return torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1))


def bench_eva(args, n, batches):
    import warnings

    import peft

    arms = ["lowrank eva", "peft eva"]
    results = run_arms(_eva_worker, arms, (args.rank, args.alpha, args.batches, args.batch_size), args.repeats)
    time_memory_table(f"4. EVA init phase (statistics + SVD + adapters), {args.batches} batches x {args.batch_size}, "
                      f"r={args.rank}, rho=2, {args.repeats} repeats", results, "peft eva")
    one = _one_batch(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = {k: a for k, (a, _, _) in _pairs_lowrank(lowrank_eva(load_model(n)[0], [one], args.rank,
                                                                      args.alpha)).items()}
        theirs = {k: a for k, (a, _, _) in _pairs_peft(peft_eva(load_model(n)[0], [one], args.rank,
                                                                  args.alpha)).items()}
    model, _ = load_model(n)
    rows = {}
    handles = [model.get_submodule(k).register_forward_hook(
        lambda mod, a, out, k=k: rows.__setitem__(k, a[0].detach().double()[one["attention_mask"].bool()]))
        for k in ours]
    with torch.no_grad():
        model(**one)
    for h in handles:
        h.remove()
    same_rank = sum(ours[k].shape[0] == theirs[k].shape[0] for k in ours)
    worst = {"ours-peft": [], "ours-exact": [], "peft-exact": []}
    for k in ours:
        r = min(ours[k].shape[0], theirs[k].shape[0])
        x = rows[k] - rows[k].mean(0)
        exact = torch.linalg.svd(x, full_matrices=False).Vh
        worst["ours-peft"].append(_angles(ours[k][:r], theirs[k][:r]).max().item())
        worst["ours-exact"].append(_angles(ours[k], exact[:ours[k].shape[0]]).max().item())
        worst["peft-exact"].append(_angles(theirs[k], exact[:theirs[k].shape[0]]).max().item())
    print(f"\nSame rows ({one['attention_mask'].sum().item()} tokens, the batches as one): rank allocation equal on "
          f"{same_rank}/{len(ours)} layers (lowrank {sorted(a.shape[0] for a in ours.values())}, "
          f"peft {sorted(a.shape[0] for a in theirs.values())})")
    print("| largest principal angle (rad) | median over layers | max |\n|---|---|---|")
    for key, v in worst.items():
        print(f"| {key} | {statistics.median(v):.2e} | {max(v):.2e} |")
    print(f"(peft {peft.__version__}: randomized incremental PCA, svd_lowrank q = 2k, niter = 4)")
