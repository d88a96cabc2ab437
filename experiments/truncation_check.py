"""What KaSA's truncation (drop each projection's ``r`` smallest singular triplets) does to a decoder LM before
any training: the validation loss of the lm-ablation task with the truncation applied to all targets and to each
projection kind alone, and per layer the output it removes on real inputs against its share of the weight.

    python -m experiments.truncation_check [lowrank_ablation/presets/lm-ablation.toml] [--rank 8] [--top 8]

For a layer ``W0 = U S V^T`` with minor triplets ``U_m S_m V_m^T`` and inputs ``X`` (the task's init batches),
it prints ``||U_m S_m V_m^T X|| / ||W0 X||`` (the output removed) beside ``||S_m|| / ||S||`` (the weight removed),
for the layers that lose the most output. Measured on lm-ablation's SmolLM2 (experiments/README.md): the loss
comes from narrow layers with flat spectra (``v_proj``, 192 triplets, loses 7-10% of its weight), not from inputs
concentrated on the minor directions (median output / weight ratio 1.2).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from lowrank.init.svd import bottom_svd

from lowrank_ablation.config import load
from lowrank_ablation.tasks.base import make_task


@torch.no_grad()
def _val_loss(model, batches) -> float:
    nll, tokens = 0.0, 0
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        k = int((b["labels"][:, 1:] != -100).sum())
        nll, tokens = nll + out.loss.item() * k, tokens + k
    return nll / tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="lowrank_ablation/presets/lm-ablation.toml")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top", type=int, default=8, help="layers to list, by output removed")
    args = p.parse_args(argv)
    cfg = load(args.config)
    task = make_task(cfg.sweep.task, cfg.task)
    built = task.build(seed=0, batch_size=cfg.sweep.batch_size)
    model = built.model.eval()
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in built.targets}
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        for b in built.init_batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    minor, rows = {}, []
    for n, m in linears.items():
        W = m.weight.detach().float()
        U, S, V = bottom_svd(W, args.rank)
        minor[n] = (U * S) @ V.T
        X = torch.cat(inputs[n])
        out_removed = float((X @ minor[n].T).norm() / (X @ W.T).norm())
        rows.append((out_removed, float(S.norm() / torch.linalg.matrix_norm(W)), n))
    base = _val_loss(model, built.val_batches)
    print(f"validation loss (NLL per response token), {len(linears)} layers, r = {args.rank}")
    print(f"  base model: {base:.3f}")
    for kind in ["all", *built.targets]:
        chosen = [n for n in linears if kind == "all" or n.endswith(kind)]
        saved = {n: linears[n].weight.data.clone() for n in chosen}
        for n in chosen:
            linears[n].weight.data -= minor[n]
        print(f"  minor triplets dropped from {kind:>9}: {_val_loss(model, built.val_batches):.3f}", flush=True)
        for n in chosen:  # the original bits back (subtracting and adding again would round)
            linears[n].weight.data.copy_(saved[n])
    rows.sort(reverse=True)
    print(f"layers removing the most output (output removed / weight removed, Frobenius), top {args.top}:")
    for out_removed, w_removed, n in rows[:args.top]:
        print(f"  {n}: {out_removed:.3g} / {w_removed:.3g} = {out_removed / w_removed:.0f}x")
    ratios = sorted(o / w for o, w, _ in rows)
    print(f"median over layers: {ratios[len(ratios) // 2]:.1f}x")


if __name__ == "__main__":
    main()
