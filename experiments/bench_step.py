"""Training-step time and memory: lowrank LoRA vs PEFT LoRA on the same model, interleaved.

    python -m experiments.bench_step [--repeats 30] [--rank 8] [--batch-size 32] [--adapter dora]
    python -m experiments.bench_step --model smollm2 --batch-size 16

``--adapter dora`` compares lowrank's ``dora`` adapter with PEFT's DoRA (``use_dora=True``).

``--grid`` (SmolLM2, the RunLoRA question): for each dtype and rank, the *floor* (every weight frozen, the
embeddings' output requiring grad: the forward plus the input-gradient backward any adapter step pays),
lowrank and PEFT at each dropout rate, steps interleaved in one process; prints per arm the median and
minimum step time, the ratios of the medians to the floor and to PEFT at the same dropout, and the bytes
saved for backward (unique storages). Each library at its defaults: PEFT keeps a bf16 base's adapters in
float32 (``autocast_adapter_dtype``), lowrank in the base's dtype.

    python -m experiments.bench_step --grid --batch-size 16 --repeats 5 [--seq-len 64] [--ranks 8 64 128]
        [--dropouts 0 0.05] [--dtypes float32 bfloat16] [--json FILE]

``--model minilm`` (default): MiniLM + a 41-way head, LoRA r=8 on all 37 linear layers (PEFT's
``target_modules`` list ``query, key, value, dense``; the pooler's ``dense`` included on both sides),
AdamW, the same WordNet batches. ``--model smollm2``: the offline SmolLM2-135M decoder LM, LoRA on all
seven projections of its 30 blocks (210 layers), batches of the ``lm-ablation`` preset's task
(reasoning-gym chain_sum prompts, loss on the responses). Steps alternate A/B in one process so machine noise hits both alike; the
median per-step time ratio lowrank/PEFT is printed.

Memory: on CUDA, peak allocated bytes per step. On CPU (no allocator statistics), the bytes a
step holds beyond the frozen model: tensors saved for backward (unique storages, measured
with ``torch.autograd.graph.saved_tensors_hooks``) plus trainable parameters, their
gradients and AdamW state. Ratios are lowrank/PEFT: below 1.0 means lowrank is cheaper.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowrank
from lowrank_ablation import presets
from lowrank_ablation.data.batches import classification_batches
from lowrank_ablation.data.minilm import load_minilm_classifier
from lowrank_ablation.data.wordnet import supersense_splits


MINILM = (["query", "key", "value", "dense"], ["classifier"])


def _load(kind: str, num_labels: int, dtype: torch.dtype = torch.float32):
    """``(model, targets, head)`` for ``kind`` (``"minilm"`` or ``"smollm2"``)."""
    if kind == "smollm2":
        from transformers import AutoModelForCausalLM

        from lowrank_ablation.tasks.causal_lm import PROJECTIONS
        from lowrank_ablation.data.smollm2 import smollm2_path

        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype), PROJECTIONS, []
    return load_minilm_classifier(num_labels)[0], *MINILM


def make_lowrank(num_labels, rank, alpha, adapter="lora", kind="minilm", dropout=0.0, dtype=torch.float32):
    model, targets, head = _load(kind, num_labels, dtype)
    cfg = lowrank.LoRAConfig(rank=rank, alpha=alpha, targets=targets, trainable=head, init="kaiming", adapter=adapter,
                             dropout=dropout)
    return lowrank.inject(model, cfg, progress=False)


def make_peft(num_labels, rank, alpha, adapter="lora", kind="minilm", dropout=0.0, dtype=torch.float32):
    import peft

    model, targets, head = _load(kind, num_labels, dtype)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, modules_to_save=head or None,
                          lora_dropout=dropout, use_dora=adapter == "dora")
    return peft.get_peft_model(model, cfg)


def make_floor(kind="smollm2", dtype=torch.float32):
    """The model with every weight frozen and the embeddings' output requiring grad."""
    model = _load(kind, 0, dtype)[0]
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    return model


def lm_batches(n: int, batch_size: int) -> list[dict]:
    """``n`` training batches of the lm-ablation preset's task (its data options, its tokenizer)."""
    from lowrank_ablation import make_task
    from lowrank_ablation.config import load

    preset = load(presets.path("lm-ablation"))
    task = make_task("causal-lm", {**preset.task, "n_train": max(n * batch_size, 64), "n_val": 1, "n_test": 1})
    stream = task.build(0, batch_size).train
    return [next(stream) for _ in range(n)]


def pad_to(batch: dict, length: int) -> dict:
    """Right-pad a causal-LM batch to ``length`` tokens (padding masked out and not scored), as a fixed shape."""
    n = length - batch["input_ids"].shape[1]
    if n <= 0:
        return {k: v[:, :length] for k, v in batch.items()}
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.cat([v, v.new_full((v.shape[0], n), fill[k])], 1) for k, v in batch.items()}


def step_cost(model, opt, batch, saved_only: bool = False) -> tuple[float, int]:
    """Run one training step; return (seconds, bytes held by the step) (``saved_only``: the bytes saved for
    backward alone, on any device). ``opt`` None: no optimizer step (the floor)."""
    device = next(model.parameters()).device
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if opt is not None:
        opt.step()
    if saved_only:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, sum(saved.values())
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    seconds = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    params = sum(2 * p.numel() * p.element_size() for p in trainable)  # weights + grads
    return seconds, sum(saved.values()) + params + state


def grid(args) -> list[dict]:
    """The floor, lowrank and PEFT per (dtype, rank, dropout), interleaved; returns one row per arm."""
    batches = [{k: v.to(args.device) for k, v in pad_to(b, args.seq_len).items()}
               for b in lm_batches(args.warmup + args.repeats, args.batch_size)]
    rows = []
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for rank in args.ranks:
            arms = {"floor": make_floor("smollm2", dtype)}
            for p in args.dropouts:
                arms[f"lowrank p={p:g}"] = make_lowrank(0, rank, args.alpha, kind="smollm2", dropout=p, dtype=dtype)
                arms[f"peft p={p:g}"] = make_peft(0, rank, args.alpha, kind="smollm2", dropout=p, dtype=dtype)
            opts, times, saved = {}, {k: [] for k in arms}, {}
            for name, model in arms.items():
                model.to(args.device).train()
                params = [q for q in model.parameters() if q.requires_grad]
                opts[name] = torch.optim.AdamW(params, lr=1e-4) if params else None
            for i, batch in enumerate(batches):
                names = list(arms)
                names = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
                for name in names:
                    sec, mem = step_cost(arms[name], opts[name], batch, saved_only=True)
                    if i >= args.warmup:
                        times[name].append(sec)
                        saved[name] = mem
            floor = statistics.median(times["floor"])
            for name in arms:
                med = statistics.median(times[name])
                lib, _, p = name.partition(" ")
                peft_med = statistics.median(times[f"peft {p}"]) if lib != "floor" else float("nan")
                rows.append({"dtype": dname, "rank": rank, "arm": name, "median_s": med, "min_s": min(times[name]),
                             "vs_floor": med / floor, "vs_peft": med / peft_med, "saved_mib": saved[name] / 2**20})
                r = rows[-1]
                print(f"{dname:8s} r={rank:<4d} {name:16s} median {med:6.2f} s  min {r['min_s']:6.2f} s  "
                      f"x floor {r['vs_floor']:5.2f}  x PEFT {r['vs_peft']:5.2f}  saved {r['saved_mib']:7.0f} MiB",
                      flush=True)
            del arms, opts
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--adapter", choices=["lora", "dora"], default="lora")
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--grid", action="store_true", help="SmolLM2: floor / lowrank / PEFT over ranks, dropouts, dtypes")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 128])
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--seq-len", type=int, default=64, help="--grid: batches padded to this many tokens")
    p.add_argument("--json", help="--grid: also write the rows to this file")
    args = p.parse_args(argv)
    if args.grid:
        torch.manual_seed(0)
        rows = grid(args)
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                           "seq_len": args.seq_len,
                           "steps": args.repeats, "rows": rows}, f, indent=1)
        return

    n_batches = args.repeats + args.warmup
    if args.model == "smollm2":
        n, raw = 0, lm_batches(n_batches, args.batch_size)
    else:
        train, _ = supersense_splits(n_train=args.batch_size * n_batches, n_eval=100)
        n = train.features["label"].num_classes
        from transformers import AutoTokenizer

        from lowrank_ablation.data.minilm import minilm_path

        tok = AutoTokenizer.from_pretrained(minilm_path())
        raw = list(classification_batches(train, tok, args.batch_size, shuffle=True))
    arms = {"lowrank": make_lowrank(n, args.rank, args.alpha, args.adapter, args.model),
            "peft": make_peft(n, args.rank, args.alpha, args.adapter, args.model)}
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in raw]
    opts, results = {}, {k: ([], []) for k in arms}
    for name, model in arms.items():
        model.to(args.device).train()
        opts[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in arms.items()}
    print(f"trainable parameters: {counts}")
    for i, batch in enumerate(batches):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))  # alternate who goes first
        for name in order:
            sec, mem = step_cost(arms[name], opts[name], batch)
            if i >= args.warmup:
                results[name][0].append(sec)
                results[name][1].append(mem)
    med = {k: (statistics.median(t), statistics.median(m)) for k, (t, m) in results.items()}
    for k, (t, m) in med.items():
        print(f"{k:8s} median step {t * 1e3:7.1f} ms   memory {m / 2**20:7.1f} MiB")
    print(f"ratio lowrank/peft: time {med['lowrank'][0] / med['peft'][0]:.3f}   "
          f"memory {med['lowrank'][1] / med['peft'][1]:.3f}   ({len(results['peft'][0])} interleaved steps, "
          f"device {args.device}, torch {torch.__version__}, model {args.model}, adapter {args.adapter})")


if __name__ == "__main__":
    main()
