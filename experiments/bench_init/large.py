"""7. Large model (``--large H,I,L``): each arm in a fresh process on a random Llama, ratios to PEFT."""

from __future__ import annotations

import os
import statistics
import time

import torch

import lowrank
from lowrank.init.stats import GradientSink

from lowrank_ablation.memory import PeakMemory
from .harness import run_arms


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(spec: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    H, I, L = (int(v) for v in spec.split(","))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=H // 64,
                      num_key_value_heads=H // 64, vocab_size=8000, max_position_embeddings=128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(cfg).to(device).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 8000, (2, 64), generator=g).to(device)), "labels": ids}
               for _ in range(2)]
    return model, batches


class _NullSink(GradientSink):
    """A gradient sink that keeps nothing of the layer inputs and only a scalar per layer (the pass checks
    that every layer was reached): the memory of the statistics pass itself, the floor under any estimator."""

    def __init__(self, modules):
        self.acc = {n: torch.zeros(()) for n in modules}
        self.accumulators = [self.acc]

    def hold(self, name, x):
        return None

    def accumulate(self, name, g, x):
        self.acc[name] += g.abs().sum()


def _large_worker(arm, spec, rank, queue):
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, batches = _llama(spec)
    profile = {}
    # "default": inject's defaults (estimator and rollback "auto", chosen from the sizes); the others pin them
    opts = {"default": {}, "dense exact": {"estimator": "dense"}, "offload": {"offload": True, "estimator": "dense"},
            "sketch": {"estimator": "sketch"}, "svd=full": {"svd": "full", "estimator": "dense"},
            "in place": {"estimator": "dense"}, "sketch in place": {"estimator": "sketch"}}
    rollback = {"default": "auto", "in place": "recompute", "sketch in place": "recompute"}.get(arm, "exact")
    est = PeakMemory()  # the estimation phase alone (started and stopped inside)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        est.__enter__()
        if arm == "floor":  # the pass itself: hooks, graph, backward, nothing accumulated
            from lowrank.inject import find_targets
            from lowrank.init.collect import collect_statistics

            cfg = lowrank.LoRAConfig(rank=rank, targets=LLAMA_TARGETS)
            modules = {t.name: t.module for t in find_targets(model, cfg)}
            collect_statistics(model, modules, batches, None, ("gradient",), progress=False,
                               gradient_sink=_NullSink(modules))
            est.__exit__(None, None, None)
        elif arm.split()[0] in ("pissa", "milora", "olora"):  # weight-based: layer by layer, on its device
            cfg = lowrank.LoRAConfig(rank=rank, alpha=16, targets=LLAMA_TARGETS, init=arm.split()[0])
            lowrank.inject(model, cfg, progress=False, rollback="recompute" if "in place" in arm else "exact")
        elif arm == "peft":
            import peft

            cfg = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=LLAMA_TARGETS, use_rslora=True,
                                  init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig())

            def train_step():
                for b in batches:
                    model(**b).loss.backward()

            peft.tuners.lora.preprocess_loraga(model, cfg, train_step)
            est.__exit__(None, None, None)
            peft.get_peft_model(model, cfg)
        else:
            from lowrank.init.driver import run_initializer
            from lowrank.plan import check_untied, commit, plan

            cfg = lowrank.LoRAConfig(rank=rank, alpha=16, scaling="rslora", targets=LLAMA_TARGETS, init="lora_ga",
                                     init_options={"progress": False, **opts[arm]})
            p = plan(model, cfg, rollback=rollback)  # inject's stops, timed
            init = p.initializer
            stats = init.collect(model, {s.name: s.module for s in p.layers}, batches, None,
                                 ranks={s.name: s.rank for s in p.layers})
            est.__exit__(None, None, None)
            t1 = time.perf_counter()
            results = run_initializer(init, p.layers, stats=stats)
            t2 = time.perf_counter()
            check_untied(model, p.layers, cfg.init, results)
            commit(p, results)
            profile = {"estimate": t1 - t0, "factorize": t2 - t1, "rest": time.perf_counter() - t2}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    if not hasattr(est, "extra"):
        est.__exit__(None, None, None)
    profile["estimate_mem"] = est.extra
    queue.put((arm, seconds, mem.extra, profile))


def bench_large(args):
    H, I, L = (int(v) for v in args.large.split(","))
    n_params = L * (4 * H * H + 3 * H * I)
    print(f"\n## 7. Large model: random Llama hidden {H}, intermediate {I}, {L} layers, 7 projections each "
          f"({7 * L} layers, {n_params / 1e6:.0f}M adapted weights: a dense float32 estimate holds "
          f"{4 * n_params / 2**30:.2f} GiB), r={args.rank}, 2 batches of 2 x 64 tokens, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, {args.repeats} repeat(s)")
    arms = (["default", "dense exact", "offload", "sketch", "in place", "sketch in place"] + (["svd=full"] if args.large_full else [])
            + ["floor", "peft"])
    if args.large_arms is not None:
        chosen = [a.strip() for a in args.large_arms.split(",") if a.strip()]
        unknown = [a for a in chosen if a not in arms]
        if unknown or (chosen and not {"floor", "peft"} <= set(chosen)):
            raise SystemExit(f"--large-arms: choose among {arms}, with 'floor' and 'peft' (the table's references); "
                             f"got {chosen}")
        arms = chosen
    if args.mmap_threshold:  # read by the C allocator when a (spawned) arm process starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        print(f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}: allocations of that size and above are returned to the "
              "system when freed, so the resident size follows the live tensors more closely")
    if arms:
        _large_table(args, arms)
    if args.large_weights:
        largest = max(H * I, H * H) * 4
        print(f"\nWeight-based inits on the same model (float32 weights: {4 * n_params / 2**20:.0f} MiB adapted, the "
              f"largest layer {largest / 2**20:.0f} MiB), one run each, offsets committed with the default exact "
              "rollback (the replaced weights kept until the end) and with rollback='recompute' (in place):")
        print("| init | time (s) | extra peak memory (MiB) | / adapted weights | / largest layer |\n|---|---|---|---|---|")
        inits = [f"{m}{suffix}" for m in ("pissa", "milora", "olora") for suffix in ("", " in place")]
        weights = run_arms(_large_worker, inits, (args.large, args.rank), 1)
        for arm, [(sec, extra, _)] in weights.items():
            print(f"| {arm} | {sec:.1f} | {extra / 2**20:.0f} | {extra / (4 * n_params):.2f} | {extra / largest:.1f} |")


def _large_table(args, arms):
    results = run_arms(_large_worker, arms, (args.large, args.rank), args.repeats)
    print("| LoRA-GA init | time (s) | extra peak memory (MiB) | time / PEFT | memory / PEFT | estimation phase: "
          "extra peak (MiB), / PEFT's | estimate / factorize / rest (s) |\n|---|---|---|---|---|---|---|")
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
               statistics.median(r[2]["estimate_mem"] for r in v)) for k, v in results.items()}
    for k in arms:
        prof = results[k][0][2]
        parts = " / ".join(f"{prof[p]:.1f}" for p in ("estimate", "factorize", "rest")) if "rest" in prof else ""
        label = {"default": "lowrank, defaults (estimator and rollback 'auto', from the sizes)",
                 "dense exact": "lowrank, estimator='dense', rollback='exact' (the defaults before 'auto')",
                 "offload": "lowrank, offload=True",
                 "sketch": "lowrank, estimator='sketch'", "svd=full": "lowrank, svd='full'",
                 "in place": "lowrank, rollback='recompute'",
                 "sketch in place": "lowrank, estimator='sketch', rollback='recompute'",
                 "floor": "the pass alone: forward + backward with hooks, nothing kept",
                 "peft": "PEFT preprocess_loraga + get_peft_model"}[k]
        print(f"| {label} | {med[k][0]:.1f} | {med[k][1] / 2**20:.0f} | {med[k][0] / med['peft'][0]:.2f} | "
              f"{med[k][1] / med['peft'][1]:.3f} | {med[k][2] / 2**20:.0f}, {med[k][2] / med['peft'][2]:.3f} | "
              f"{parts} |")
    floor = med["floor"][2]
    print(f"\nAbove the floor (the estimation phase minus the pass alone, {floor / 2**20:.0f} MiB): "
          + ", ".join(f"{k} {(med[k][2] - floor) / 2**20:.0f} MiB ({(med[k][2] - floor) / (med['peft'][2] - floor):.3f} "
                      "of PEFT's)" for k in ("default", "offload", "sketch") if k in med))
