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
lowrank (eval mode) see the same gradient.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
from tqdm.auto import tqdm

import lowrank
from lowrank.init.stats import GradientSink
from experiments.data.batches import classification_batches
from experiments.data.wordnet import supersense_splits

from .ablation.memory import PeakMemory

TARGETS = ["query", "key", "value", "dense"]
ENCODER = r"bert\.encoder\.layer\.\d+\..*(query|key|value|dense)"
"""The encoder's linear layers (the pooler's ``dense`` sees 2-D inputs, which PEFT's EVA cannot take)."""


def load_model(num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    from experiments.data.minilm import minilm_path

    logging.set_verbosity_error()
    path = minilm_path()
    torch.manual_seed(0)  # the classifier head is new: seed it so every arm sees the same gradient
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def get_batches(n_batches: int, batch_size: int, seed: int = 1):
    train, _ = supersense_splits(n_train=n_batches * batch_size * 2, n_eval=100)
    n = train.features["label"].num_classes
    model, tok = load_model(n)
    return n, list(classification_batches(train, tok, batch_size, shuffle=True, seed=seed))[:n_batches]


def lowrank_lora_ga(model, batches, rank, alpha, svd="full", variant="paper"):
    cfg = lowrank.LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS, scaling="rslora", init="lora_ga",
                             init_options={"progress": False, "svd": svd, "variant": variant})
    lowrank.inject(model, cfg, data=batches, progress=False)
    return model


def peft_lora_ga(model, batches, rank, alpha, targets=TARGETS):
    """PEFT's LoRA-GA as its docs use it: ``preprocess_loraga`` on the batches, then ``get_peft_model``."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=True, lora_dropout=0.0,
                          init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig())

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    peft.tuners.lora.preprocess_loraga(model, cfg, train_step)
    return peft.get_peft_model(model, cfg)


def _init_worker(arm, rank, alpha, n_batches, batch_size, queue):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    n, batches = get_batches(n_batches, batch_size)
    model, _ = load_model(n)
    fn = {"lowrank": lowrank_lora_ga, "peft": peft_lora_ga,
          "lowrank randomized": lambda *a: lowrank_lora_ga(*a, svd="randomized")}[arm]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        fn(model, batches, rank, alpha)
        seconds = time.perf_counter() - t0
    queue.put((arm, seconds, mem.extra))


def run_arms(worker, arms, extra_args, repeats):
    """``{arm: [result[1:] per repeat]}``: each arm in a fresh spawned process per repeat, the order of the
    arms reversed on every other repeat; ``worker(arm, *extra_args, queue)`` puts ``(arm, ...)`` on the queue."""
    ctx = mp.get_context("spawn")
    results = {k: [] for k in arms}
    for i in range(repeats):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            q = ctx.Queue()
            p = ctx.Process(target=worker, args=(arm, *extra_args, q))
            p.start()
            res = q.get()
            p.join()
            results[arm].append(res[1:])
    return results


def time_memory_table(title: str, results: dict, peer: str, memory: str = "extra peak RSS (MiB)") -> None:
    """Print the median time and extra memory of each arm of ``run_arms`` results (``(seconds, bytes)`` per
    repeat) and each arm's ratio to ``peer``, measured side by side in the same run."""
    med = {k: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    print(f"\n## {title}")
    print(f"| | time (s) | {memory} |\n|---|---|---|")
    for k, (s, m) in med.items():
        print(f"| {k} | {s:.2f} | {m / 2**20:.0f} |")
    for k in (k for k in med if k != peer):
        print(f"| ratio {k}/{peer} | {med[k][0] / med[peer][0]:.3f} | {med[k][1] / med[peer][1]:.3f} |")


def bench_lora_ga_init(args):
    arms = ["lowrank", "lowrank randomized", "peft"]
    results = run_arms(_init_worker, arms, (args.rank, args.alpha, args.batches, args.batch_size), args.repeats)
    time_memory_table("1. LoRA-GA init phase (gradient estimate + SVD + adapters), "
                      f"{args.batches} batches x {args.batch_size}, r={args.rank}, {args.repeats} repeats", results,
                      "peft")


def _pairs_peft(model):
    """``{name: (A, B, s)}`` of a PEFT LoRA model, keyed by the base model's module names."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = (mod.lora_A["default"].weight.detach().double(), mod.lora_B["default"].weight.detach().double(),
                        mod.scaling["default"])
    return out


def _pairs_lowrank(model):
    return {n: (layer.A.detach().double(), layer.B.detach().double(), layer.scaling)
            for n, layer in lowrank.adapted_layers(model)}


def bench_pissa(args, n):
    import peft

    print(f"\n## 2. PiSSA rank-{args.rank} part: randomized vs full SVD (all {len(TARGETS)} target kinds, "
          f"{args.repeats} repeats, time = whole init)")
    rows = {}
    arms = {
        "lowrank pissa full": lambda m: lowrank.inject(m, lowrank.LoRAConfig(rank=args.rank, alpha=args.alpha,
                                                                            targets=TARGETS, init="pissa"), progress=False),
        "lowrank pissa randomized": lambda m: lowrank.inject(m, lowrank.LoRAConfig(
            rank=args.rank, alpha=args.alpha, targets=TARGETS, init="pissa", init_options={"svd": "randomized"}),
            progress=False),
        "peft pissa_niter_4": lambda m: peft.get_peft_model(m, peft.LoraConfig(
            r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, init_lora_weights="pissa_niter_4")),
    }
    base, _ = load_model(n)
    W0 = {name: mod.weight.detach().double() for name, mod in base.named_modules() if isinstance(mod, torch.nn.Linear)
          and name.rsplit(".", 1)[-1] in TARGETS}
    truncs = {}
    for name, w in W0.items():
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        truncs[name] = ((U[:, :args.rank] * S[:args.rank]) @ Vh[:args.rank], (S[args.rank:] ** 2).sum().sqrt())
    times = {k: [] for k in arms}
    errs = {}
    for i in range(args.repeats):
        for k, fn in (arms.items() if i % 2 == 0 else reversed(list(arms.items()))):
            model, _ = load_model(n)
            t0 = time.perf_counter()
            model = fn(model)
            times[k].append(time.perf_counter() - t0)
            pairs = _pairs_peft(model) if k.startswith("peft") else _pairs_lowrank(model)
            e_part, e_ey = [], []
            for name, (A, B, s) in pairs.items():
                ref, floor = truncs[name]
                part = s * B @ A
                e_part.append(((part - ref).norm() / ref.norm()).item())
                e_ey.append(((W0[name] - part).norm() / floor - 1).item())
            errs[k] = (statistics.median(e_part), max(e_part), statistics.median(e_ey))
    print("| | rank-r part rel. error (median / max over layers) | Eckart-Young suboptimality (median) | time (s) |")
    print("|---|---|---|---|")
    for k in arms:
        e = errs[k]
        t = statistics.median(times[k])
        rows[k] = t
        print(f"| {k} | {e[0]:.4f} / {e[1]:.4f} | {e[2]:.2e} | {t:.3f} |")
    print(f"time ratio lowrank randomized / peft pissa_niter_4: {rows['lowrank pissa randomized'] / rows['peft pissa_niter_4']:.2f}")


def bench_alignment(args, n, batches):
    print(f"\n## 3. First-step alignment with G_2r on the same gradient (r={args.rank})")
    model, _ = load_model(n)
    modules = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and name.rsplit(".", 1)[-1] in TARGETS}
    G = lowrank.init.estimate_gradients(model, modules, batches, lowrank.default_loss, progress=False)
    arms = {
        "lowrank lora_ga": _pairs_lowrank(lowrank_lora_ga(load_model(n)[0], batches, args.rank, args.alpha)),
        "lowrank lora_ga svd=randomized": _pairs_lowrank(
            lowrank_lora_ga(load_model(n)[0], batches, args.rank, args.alpha, svd="randomized")),
        "peft lora_ga": _pairs_peft(peft_lora_ga(load_model(n)[0], batches, args.rank, args.alpha)),
        "lowrank lora_ga variant=peft": _pairs_lowrank(
            lowrank_lora_ga(load_model(n)[0], batches, args.rank, args.alpha, svd="auto", variant="peft")),
    }
    print("| | sin(angle(first step, G_2r)) median | max | sin(angle(first step, G)) median |\n|---|---|---|---|")
    for label, pairs in arms.items():
        sines, sines_full = [], []
        for name, (A, B, s) in pairs.items():
            g = G[name].double()
            U, S, Vh = torch.linalg.svd(g, full_matrices=False)
            g2r = (U[:, :2 * args.rank] * S[:2 * args.rank]) @ Vh[:2 * args.rank]
            step = s ** 2 * (B @ B.T @ g + g @ A.T @ A)
            for ref, acc in ((g2r, sines), (g, sines_full)):
                cos = (step * ref).sum() / (step.norm() * ref.norm())
                acc.append(float((1 - cos.clamp(max=1) ** 2).clamp(min=0).sqrt()))
        print(f"| {label} | {statistics.median(sines):.2e} | {max(sines):.2e} | {statistics.median(sines_full):.3f} |")


def _one_batch(batches):
    """The batches as one, padded to the longest (the attention mask marks the padding)."""
    L = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda t: torch.nn.functional.pad(t, (0, L - t.shape[1]))  # noqa: E731
    return {"input_ids": torch.cat([pad(b["input_ids"]) for b in batches]),
            "attention_mask": torch.cat([pad(b["attention_mask"]) for b in batches]),
            "labels": torch.cat([b["labels"] for b in batches])}


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


def bench_stats(args, n, batches):
    from lowrank.init.statistics import collect_statistics

    model, _ = load_model(n)
    import re

    modules = {k: m for k, m in model.named_modules() if re.fullmatch(ENCODER, k)}
    times = {need: [] for need in ("gradient", "covariance", "input_svd")}
    for i in range(args.repeats):
        for need in (times if i % 2 == 0 else list(times)[::-1]):
            t0 = time.perf_counter()
            collect_statistics(model, modules, batches, None, (need,), progress=False)
            times[need].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n## 5. Statistics pass, {len(modules)} layers, {args.batches} batches x {args.batch_size}, "
          f"{args.repeats} repeats (median)")
    print("| need | time (s) | ratio to the gradient pass |\n|---|---|---|")
    for k, t in med.items():
        print(f"| {k} | {t:.2f} | {t / med['gradient']:.3f} |")


def _sketch_excess(n, batches, rank, alpha, arms):
    """Per arm, every layer's first-step excess over the Eckart-Young floor (against the dense ``G`` of the same
    batches), and the init time."""
    from lowrank.theory import alignment

    model, _ = load_model(n)
    modules = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and name.rsplit(".", 1)[-1] in TARGETS}
    G = lowrank.init.estimate_gradients(model, modules, batches, lowrank.default_loss, progress=False)
    out = {}
    for label, opts in arms.items():
        m, _ = load_model(n)
        cfg = lowrank.LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS, scaling="rslora", init="lora_ga",
                                 init_options={"progress": False, **opts})
        t0 = time.perf_counter()
        lowrank.inject(m, cfg, data=batches, progress=False)
        seconds = time.perf_counter() - t0
        layers = dict(lowrank.adapted_layers(m))
        out[label] = ([alignment(*layers[k].factors(), layers[k].scaling, G[k]) for k in G], seconds)
    return out


def bench_sketch_draws(args):
    """The default sketch on held-out draws of the batches: is its median excess a property of the default or of
    the one draw it was measured on?"""
    from lowrank.init.sketch import DEFAULT_PASSES

    arms = {f"sketch, {DEFAULT_PASSES} passes (default)": {"estimator": "sketch"},
            "sketch, 4 passes": {"estimator": "sketch", "passes": 4},
            f"sketch, {DEFAULT_PASSES} passes, krylov=True": {"estimator": "sketch", "krylov": True}}
    per_draw = {a: [] for a in arms}
    pooled = {a: [] for a in arms}
    n, pool = get_batches(args.batches * args.draws, args.batch_size, seed=2)
    for d in tqdm(range(args.draws), desc="draws"):
        batches = pool[d * args.batches:(d + 1) * args.batches]
        for label, (al, _) in _sketch_excess(n, batches, args.rank, args.alpha, arms).items():
            ex = [a.excess for a in al]
            per_draw[label].append(statistics.median(ex))
            pooled[label] += ex
    print(f"\n## 6b. Sketched LoRA-GA on {args.draws} held-out draws (disjoint, shuffle seed 2) of "
          f"{args.batches} x {args.batch_size} examples, r={args.rank}, width {8 * args.rank}")
    print("| estimator | excess median per draw | median over (draw, layer) | max over draws of the median | max |")
    print("|---|---|---|---|---|")
    for label in arms:
        print(f"| {label} | {', '.join(f'{v:.1e}' for v in per_draw[label])} | {statistics.median(pooled[label]):.2e} "
              f"| {max(per_draw[label]):.2e} | {max(pooled[label]):.2e} |")


def bench_sketch(args, n, batches):
    from lowrank.init.sketch import DEFAULT_PASSES

    arms = {"dense": {}} | {f"sketch, {p} pass{'es' if p > 1 else ''}": {"estimator": "sketch", "passes": p}
                            for p in range(1, 5)}
    arms |= {f"sketch, {p} passes, krylov=True": {"estimator": "sketch", "passes": p, "krylov": True} for p in (3, 4)}
    results = _sketch_excess(n, batches, args.rank, args.alpha, arms)
    print(f"\n## 6. Sketched LoRA-GA, r={args.rank}, sketch width {8 * args.rank} (default), "
          f"{len(results['dense'][0])} layers, {args.batches} x {args.batch_size} examples; default passes = "
          f"{DEFAULT_PASSES}")
    print("| estimator | sin(step, G_2r) median / max | excess over floor median / max | init time (s) |")
    print("|---|---|---|---|")
    for label, (al, seconds) in results.items():
        sines = sorted(a.rel_error_2r for a in al)
        ex = sorted(a.excess for a in al)
        print(f"| {label} | {statistics.median(sines):.2e} / {sines[-1]:.2e} | {statistics.median(ex):.2e} / "
              f"{ex[-1]:.2e} | {seconds:.2f} |")


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
            from lowrank.init.statistics import collect_statistics

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


if __name__ == "__main__":
    main()
