"""torch.distributed: 2 gloo processes on CPU. Identical inits on every rank, equal to one process on
the union of the shards; one DDP step equals the single-process step on the union batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lowrank
from lowrank.init.gradient import estimate_gradients
from tests.conftest import batches, tiny_bert

WORLD = 2
CFG = dict(rank=2, alpha=4, scaling="rslora", targets=["query", "value", "dense"], trainable=["classifier"])


def _setup(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _teardown() -> None:
    """Every rank reaches the end before any tears its group down: a rank that exits while its peer is
    still inside gloo can make the peer abort (seen as an occasional SIGABRT after the error tests)."""
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    _setup(rank, init_file)
    try:
        data = batches("bert", 4, seed=1)
        shard = data[rank::WORLD]
        # 1. the mean gradient over the union, and the LoRA-GA init, on every rank
        model = tiny_bert()
        mods = {n: m for n, m in model.named_modules() if n.endswith(("query", "value"))}
        G = estimate_gradients(model, mods, shard, lowrank.default_loss, progress=False)
        from lowrank.init.lora_ga import LoRAGA

        calls = []

        @lowrank.register_initializer("counting_lora_ga", override=True)
        class Counting(LoRAGA):  # LoRA-GA that records which layers this rank factorized
            def init_layer(self, ctx):
                calls.append(ctx.name)
                return super().init_layer(ctx)

        cfg = lowrank.LoRAConfig(init="counting_lora_ga", init_options={"progress": False}, **CFG)
        lowrank.inject(model, cfg, data=shard, progress=False)
        layers = {n: {"A": l.A.detach().clone(), "B": l.B.detach().clone(), "W": l.base_weight().detach().clone()}
                  for n, l in lowrank.adapted_layers(model)}
        # 2. one DDP step from a data-free init (identical everywhere by construction)
        ddp_model = lowrank.inject(tiny_bert(), lowrank.LoRAConfig(init="gaussian", init_options={"b_std": 0.05},
                                                                   seed=4, **CFG))
        ddp = torch.nn.parallel.DistributedDataParallel(ddp_model.train())
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        opt.zero_grad()
        ddp(**shard[0]).loss.backward()
        opt.step()
        stepped = {n: p.detach().clone() for n, p in ddp_model.named_parameters() if p.requires_grad}
        torch.save({"G": G, "layers": layers, "stepped": stepped, "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _teardown()


def _peft_worker(rank: int, init_file: str, out_dir: str) -> None:
    """lowrank.peft.initialize on a PEFT model, with an initializer whose factors differ by rank (as
    nondeterministic kernels could make them): the driver's broadcast must leave rank 0's everywhere."""
    import warnings

    import peft

    from lowrank.init.lora_ga import LoRAGA

    _setup(rank, init_file)
    try:
        @lowrank.register_initializer("skewed_lora_ga", override=True)
        class Skewed(LoRAGA):
            def init_layer(self, ctx):
                res = super().init_layer(ctx)
                res.A = res.A + 1e-3 * dist.get_rank()
                return res

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                                                                  target_modules=["query", "value"]))
        lowrank.peft.initialize(pm, "skewed_lora_ga", data=batches("bert", 4, seed=1)[rank::WORLD],
                                init_options={"progress": False})
        out = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n or "query" in n or "value" in n}
        torch.save(out, os.path.join(out_dir, f"peft{rank}.pt"))
    finally:
        _teardown()


def test_peft_initialize_gives_bitwise_identical_factors_and_bases_on_every_rank(tmp_path):
    _spawn(_peft_worker, tmp_path)
    a, b = (torch.load(tmp_path / f"peft{r}.pt") for r in range(WORLD))
    assert set(a) == set(b) and any("lora_A" in n for n in a) and any("base_layer.weight" in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _failing_worker(rank: int, init_file: str, out_dir: str) -> None:
    _setup(rank, init_file)
    try:
        data = batches("bert", 2, seed=1)

        def loss_fn(model, batch):  # a NaN loss on rank 1 only
            loss = model(**batch).loss
            return loss * float("nan") if rank == 1 else loss

        model = tiny_bert()
        mods = {n: m for n, m in model.named_modules() if n.endswith("query")}
        try:
            estimate_gradients(model, mods, data[rank:rank + 1], loss_fn, progress=False)
            msg = "no error"
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(msg)
    finally:
        _teardown()


def _spawn(fn, tmp_path) -> None:
    init_file = str(tmp_path / "pg_init")
    mp.spawn(fn, args=(init_file, str(tmp_path)), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _spawn(_worker, tmp)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_inits_are_bitwise_identical_on_every_rank(ranks):
    a, b = ranks
    assert set(a["layers"]) == set(b["layers"])
    for name in a["layers"]:
        for key in ("A", "B", "W"):
            assert torch.equal(a["layers"][name][key], b["layers"][name][key]), (name, key)
    for name in a["G"]:
        assert torch.equal(a["G"][name], b["G"][name])


def test_each_layer_is_factorized_on_one_rank_only(ranks):
    a, b = (set(r["calls"]) for r in ranks)
    assert a and b and not (a & b) and a | b == set(ranks[0]["layers"])  # split, and every layer covered
    assert len(ranks[0]["calls"]) + len(ranks[1]["calls"]) == len(ranks[0]["layers"])


def test_equal_to_one_process_on_the_union(ranks):
    data = batches("bert", 4, seed=1)
    model = tiny_bert()
    mods = {n: m for n, m in model.named_modules() if n.endswith(("query", "value"))}
    G = estimate_gradients(model, mods, data, lowrank.default_loss, progress=False)
    for name, g in G.items():
        torch.testing.assert_close(ranks[0]["G"][name], g, rtol=1e-5, atol=1e-7)
    cfg = lowrank.LoRAConfig(init="lora_ga", init_options={"progress": False}, **CFG)
    single = dict(lowrank.adapted_layers(lowrank.inject(tiny_bert(), cfg, data=data, progress=False)))
    for name, layer in single.items():  # singular vectors have arbitrary signs: compare projections
        A, B = ranks[0]["layers"][name]["A"], ranks[0]["layers"][name]["B"]
        torch.testing.assert_close(A.T @ A, layer.A.detach().T @ layer.A.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(B @ B.T, layer.B.detach() @ layer.B.detach().T, rtol=1e-4, atol=1e-5)


def test_ddp_step_equals_single_process_step_on_the_union_batch(ranks):
    data = batches("bert", 4, seed=1)
    union = {k: torch.cat([data[0][k], data[1][k]]) for k in data[0]}  # rank 0's and rank 1's first batches
    model = lowrank.inject(tiny_bert(), lowrank.LoRAConfig(init="gaussian", init_options={"b_std": 0.05}, seed=4,
                                                           **CFG)).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad()
    model(**union).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ranks[0]["stepped"][name], p.detach(), rtol=1e-5, atol=1e-6)
            assert torch.equal(ranks[0]["stepped"][name], ranks[1]["stepped"][name])


def _failing_init_worker(rank: int, init_file: str, out_dir: str) -> None:
    from lowrank.init.lora_ga import LoRAGA

    _setup(rank, init_file)
    try:
        @lowrank.register_initializer("fails_on_rank_1", override=True)
        class Fails(LoRAGA):
            def init_layer(self, ctx):
                if dist.get_rank() == 1:
                    raise ValueError(f"no factors for {ctx.name}")
                return super().init_layer(ctx)

        _inject_and_report(rank, out_dir, lowrank.LoRAConfig(init="fails_on_rank_1", init_options={"progress": False},
                                                             **CFG))
    finally:
        _teardown()


def _inject_and_report(rank: int, out_dir: str, cfg) -> None:
    """Inject on this rank's shard; write the error (or "no error") and how many adapters the model has."""
    model = tiny_bert()
    try:
        lowrank.inject(model, cfg, data=batches("bert", 2, seed=1)[rank::WORLD], progress=False)
        msg = "no error"
    except Exception as exc:  # noqa: BLE001
        msg = f"{type(exc).__name__}: {exc}"
    msg += f" | adapters: {len(list(lowrank.adapted_layers(model)))}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(msg)


def test_an_initializer_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    _spawn(_failing_init_worker, tmp_path)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert msgs[1].startswith("ValueError: no factors for") and msgs[1].endswith("adapters: 0"), msgs
    assert msgs[0].startswith("RuntimeError: initialization failed on another rank") and msgs[0].endswith("adapters: 0")


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    _spawn(_failing_worker, tmp_path)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert msgs[1].startswith("FloatingPointError: non-finite loss"), msgs
    assert msgs[0].startswith("RuntimeError: gradient estimation failed on another rank"), msgs


def test_inject_refuses_ddp_wrapped_and_sharded_models(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_bert())
        with pytest.raises(TypeError, match="before wrapping it in DistributedDataParallel"):
            lowrank.inject(ddp, lowrank.LoRAConfig(rank=2, targets=["query"]))
    finally:
        _teardown()
    model = tiny_bert()
    q = model.bert.encoder.layer[0].attention.self.query
    q.weight.ds_id = 7  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(TypeError, match="sharded weight"):
        lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=["query"]))


def _input_stats_worker(rank: int, init_file: str, out_dir: str) -> None:
    """EVA (forward-only statistics, ranks allocated) and CorDA on each rank's shard."""
    _setup(rank, init_file)
    try:
        shard = batches("bert", 4, seed=1)[rank::WORLD]
        out = {}
        for init, opts in (("eva", {"rho": 2.0}), ("corda", {})):
            cfg = lowrank.LoRAConfig(rank=2, alpha=4, targets=["query", "value", "dense"], init=init,
                                     init_options={"progress": False, **opts})
            model = lowrank.inject(tiny_bert(), cfg, data=shard, progress=False)
            out[init] = {n: (l.rank, l.A.detach().clone(), l.B.detach().clone(), l.base_weight().detach().clone())
                         for n, l in lowrank.adapted_layers(model)}
        torch.save(out, os.path.join(out_dir, f"stats{rank}.pt"))
    finally:
        _teardown()


def test_input_statistics_inits_are_identical_on_every_rank_and_equal_one_process(tmp_path):
    _spawn(_input_stats_worker, tmp_path)
    a, b = (torch.load(tmp_path / f"stats{r}.pt") for r in range(WORLD))
    data = batches("bert", 4, seed=1)
    for init, opts in (("eva", {"rho": 2.0}), ("corda", {})):
        for name in a[init]:
            assert a[init][name][0] == b[init][name][0], name  # the same allocated rank
            for x, y in zip(a[init][name][1:], b[init][name][1:]):
                assert torch.equal(x, y), (init, name)
        cfg = lowrank.LoRAConfig(rank=2, alpha=4, targets=["query", "value", "dense"], init=init,
                                 init_options={"progress": False, **opts})
        single = dict(lowrank.adapted_layers(lowrank.inject(tiny_bert(), cfg, data=data, progress=False)))
        assert sum(a[init][n][0] for n in single) == 2 * len(single)
        for name, layer in single.items():
            rk, A, B, W = a[init][name]
            assert rk == layer.rank, (init, name)
            torch.testing.assert_close(layer.scaling * B @ A, layer.scaling * layer.B.detach() @ layer.A.detach(),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(A.T @ A, layer.A.detach().T @ layer.A.detach(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(W, layer.base_weight().detach(), rtol=1e-5, atol=1e-6)


def _sketch_worker(rank: int, init_file: str, out_dir: str) -> None:
    _setup(rank, init_file)
    try:
        shard = batches("bert", 4, seed=1)[rank::WORLD]
        cfg = lowrank.LoRAConfig(init="lora_ga", init_options={"progress": False, "estimator": "sketch"}, **CFG)
        model = lowrank.inject(tiny_bert(), cfg, data=shard, progress=False)
        torch.save({n: (l.A.detach().clone(), l.B.detach().clone(), l.base_weight().detach().clone())
                    for n, l in lowrank.adapted_layers(model)}, os.path.join(out_dir, f"sketch{rank}.pt"))
    finally:
        _teardown()


def test_sketched_inits_are_identical_on_every_rank_and_equal_one_process(tmp_path):
    """Sketches are linear in the gradient pieces: all-reduced after every pass, they equal one process's on
    the union of the shards (up to summation order), and every rank holds the same bits."""
    _spawn(_sketch_worker, tmp_path)
    a, b = (torch.load(tmp_path / f"sketch{r}.pt") for r in range(WORLD))
    cfg = lowrank.LoRAConfig(init="lora_ga", init_options={"progress": False, "estimator": "sketch"}, **CFG)
    single = dict(lowrank.adapted_layers(lowrank.inject(tiny_bert(), cfg, data=batches("bert", 4, seed=1),
                                                        progress=False)))
    assert set(a) == set(single)
    for name, layer in single.items():
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name
        A, B, _ = a[name]
        torch.testing.assert_close(A.T @ A, layer.A.detach().T @ layer.A.detach(), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(B @ B.T, layer.B.detach() @ layer.B.detach().T, rtol=1e-3, atol=1e-4)


SPLIT_ARMS = {"one pass": dict(passes=1), "subspace": dict(passes=3), "krylov": dict(passes=3, krylov=True)}


def _split_worker(rank: int, init_file: str, out_dir: str) -> None:
    """The sketch with its state split across the ranks (each layer's basis and sums on one owner) against the
    replicated sketch, on the same shards; which layers each rank's sinks held; an unreached layer."""
    from lowrank.init import sketch

    _setup(rank, init_file)
    try:
        shard = batches("bert", 4, seed=1)[rank::WORLD]
        held: list[set] = []
        real = sketch._Sketches.__init__

        def spy(self, *args, **kwargs):
            real(self, *args, **kwargs)
            held.append({n for kind in self.accumulators for n in kind})

        sketch._Sketches.__init__ = spy
        model = tiny_bert()
        mods = {n: m for n, m in model.named_modules() if n.endswith(("query", "value", "output.dense"))}
        out = {"layers": sorted(mods)}
        for arm, opts in SPLIT_ARMS.items():
            for split in (False, True):
                held.clear()
                out[arm, split] = sketch.sketch_gradient_svd(model, mods, shard, lowrank.default_loss,
                                                             k=dict.fromkeys(mods, 3), progress=False,
                                                             shard_state=split, **opts)
                out[arm, split, "held"] = [sorted(h) for h in held]
        sketch._Sketches.__init__ = real
        # a layer the loss never reaches: named on both ranks (only its owner sees its sums)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
        data = [torch.randn(3, 6, generator=torch.Generator().manual_seed(rank))]

        def outcome(batches, loss_fn) -> str:
            try:
                sketch.sketch_gradient_svd(model, {"0": model[0], "1": model[1]}, batches, loss_fn,
                                           k={"0": 2, "1": 2}, progress=False, shard_state=True)
                return "no error"
            except Exception as exc:  # noqa: BLE001
                return f"{type(exc).__name__}: {exc}"

        out["unreached"] = outcome(data, lambda m, x: m[0](x).pow(2).mean())
        # ranks with different numbers of batches: an error on both, before the pass (not a hang in a hook)
        out["uneven"] = outcome(data * (2 - rank), lambda m, x: m(x).pow(2).mean())
        torch.save(out, os.path.join(out_dir, f"split{rank}.pt"))
    finally:
        _teardown()


def test_a_sketch_split_across_ranks_holds_each_layer_once_and_equals_the_replicated_sketch(tmp_path):
    _spawn(_split_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"split{r}.pt") for r in range(WORLD))
    layers = set(r0["layers"])
    for arm in SPLIT_ARMS:
        # replicated: every rank holds every layer's sums; split: each layer on exactly one rank, every pass
        assert all(set(h) == layers for r in (r0, r1) for h in r[arm, False, "held"])
        for h0, h1 in zip(r0[arm, True, "held"], r1[arm, True, "held"], strict=True):
            assert h0 and h1 and not set(h0) & set(h1) and set(h0) | set(h1) == layers, (arm, h0, h1)
        for name in layers:
            for x, y in zip(r0[arm, True][name], r1[arm, True][name]):
                assert torch.equal(x, y), (arm, name)  # the owner's bits on every rank
            (U, S, V), (U1, S1, V1) = r0[arm, True][name], r0[arm, False][name]
            # the same sketch summed per batch rather than per pass: equal to float32 rounding
            torch.testing.assert_close(S, S1, rtol=1e-4, atol=1e-6 * float(S1[0]))
            torch.testing.assert_close(U @ U.T, U1 @ U1.T, rtol=0, atol=1e-4)
            torch.testing.assert_close(V @ V.T, V1 @ V1.T, rtol=0, atol=1e-4)
    for r in (r0, r1):
        assert r["unreached"].startswith("ValueError") and "['1']" in r["unreached"], r["unreached"]
        assert r["uneven"].startswith("ValueError") and "rank 0: 2, rank 1: 1" in r["uneven"], r["uneven"]


def _different_models_worker(rank: int, init_file: str, out_dir: str) -> None:
    _setup(rank, init_file)
    try:
        targets = ["query", "value"] if rank == 0 else ["query"]  # rank 1 built another model
        _inject_and_report(rank, out_dir, lowrank.LoRAConfig(rank=2, alpha=4, targets=targets, init="lora_ga",
                                                             init_options={"progress": False}))
    finally:
        _teardown()


def test_ranks_with_different_layers_are_an_error_on_every_rank(tmp_path):
    """Without the check, the per-layer sums would be all-reduced across different layers (or gloo aborts)."""
    _spawn(_different_models_worker, tmp_path)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    for m in msgs:
        assert m.startswith("ValueError: data-parallel 'lora_ga' init: rank 1 has other layers than rank 0"), msgs
        assert m.endswith("adapters: 0")
