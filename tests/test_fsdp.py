"""FSDP2 (``fully_shard``) bases on 2 gloo processes: the blocks and the root are sharded first, then
``lowrank.inject``; the factors and every rank's residual shard equal one process on the union of the data; a
training step after the init keeps the adapters identical on every rank and equals the single-process step on
the union batch; a rank with a different model is an error on every rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lowrank
import lowrank.fsdp
from tests.conftest import batches, tiny_llama

WORLD = 2
TARGETS = ["q_proj", "v_proj", "down_proj"]
ARMS = {"lora_ga": {"progress": False}, "lora_ga_sketch": {"progress": False, "estimator": "sketch"},
        "pissa": {}}
# the training step starts from a data-free init (no sign ambiguity): the same factors in both runs
STEP = lowrank.LoRAConfig(rank=2, alpha=4, scaling="rslora", targets=TARGETS, init="gaussian",
                          init_options={"b_std": 0.05}, seed=3)


def _config(arm: str, seed: int = 0) -> lowrank.LoRAConfig:
    init = "lora_ga" if arm.startswith("lora_ga") else arm
    return lowrank.LoRAConfig(rank=2, alpha=4, scaling="rslora", targets=TARGETS, init=init, init_options=ARMS[arm],
                              seed=seed)


def _sharded(mesh, hidden: int | None = None, placement=None):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    if hidden is not None:  # a different model on this rank
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=97)).eval()
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh)
    return model


def _layers(model) -> dict:
    return {n: {"A": layer.A.detach().clone(), "B": layer.B.detach().clone(),
                "W": layer.base_layer.weight.to_local().detach().clone(),
                "rows": lowrank.sharding.local_rows(layer.base_layer.weight)}
            for n, layer in lowrank.adapted_layers(model)}


def _gathered_blocks_in_backward(model, data) -> dict:
    """How many blocks hold gathered parameters (or a pending all-gather) when each block's backward starts: in a
    plain backward (FSDP's default prefetch of the previous block) and in lowrank's statistics pass; and whether
    FSDP's prefetch settings are back after the pass."""
    from torch.distributed.fsdp import FSDPModule

    blocks = [b for b in model.model.layers if isinstance(b, FSDPModule)]

    def gathered() -> int:
        return sum(any(g._all_gather_result is not None or g.is_unsharded for g in b._get_fsdp_state()._fsdp_param_groups)
                   for b in blocks)

    seen: dict = {"default": [], "pass": []}
    key = ["default"]

    def watch(module, args, out):
        t = out[0] if isinstance(out, tuple) else out
        if t.requires_grad:  # registered after FSDP's own pre-backward hook: runs once this block is gathered
            t.register_hook(lambda g: seen[key[0]].append(gathered()))

    handles = [b.register_forward_hook(watch) for b in blocks]
    model.train()
    model(**data[0]).loss.backward()
    key[0] = "pass"
    lowrank.inject(model, _config("lora_ga"), data=data, progress=False)
    for h in handles:
        h.remove()
    seen["restored"] = all(b._get_fsdp_state()._states_to_backward_prefetch == [] for b in blocks)
    return seen


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        data = batches("llama", 4, seed=1)
        out = {}
        from lowrank.init import sketch

        held, real = [], sketch._Sketches.__init__

        def spy(self, *args, **kwargs):  # which layers' sketch state this rank holds, pass by pass
            real(self, *args, **kwargs)
            held.append(sorted({n for kind in self.accumulators for n in kind}))

        sketch._Sketches.__init__ = spy
        for arm in ARMS:
            model = _sharded(mesh)
            lowrank.inject(model, _config(arm), data=data[rank::WORLD] if arm != "pissa" else None, progress=False)
            out[arm] = _layers(model)
        sketch._Sketches.__init__ = real
        out["sketch_held"] = held
        out["gathered"] = _gathered_blocks_in_backward(_sharded(mesh), data[rank::WORLD])
        model = _sharded(mesh)  # offsets written in place, no copy of the shards kept
        lowrank.inject(model, _config("lora_ga"), data=data[rank::WORLD], progress=False, rollback="recompute")
        out["recompute"] = _layers(model)
        # a training step after the init: adapters replicated, their gradients averaged
        model = _sharded(mesh)
        lowrank.inject(model, STEP, progress=False)
        lowrank.fsdp.replicate_adapters(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.train()
        model(**data[rank]).loss.backward()
        opt.step()
        out["stepped"] = _layers(model)
        # the same step without calling replicate_adapters: inject arranged the averaging; explicit calls are
        # idempotent (one hook per adapter parameter)
        model = _sharded(mesh)
        lowrank.inject(model, STEP, progress=False)
        params = [p for _, layer in lowrank.adapted_layers(model) for p in layer.adapter_parameters().values()]
        out["hooks"] = [len(p._post_accumulate_grad_hooks or {}) for p in params]
        lowrank.fsdp.replicate_adapters(model)
        lowrank.fsdp.replicate_adapters(model)
        out["hooks_after_calls"] = [len(p._post_accumulate_grad_hooks or {}) for p in params]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.train()
        model(**data[rank]).loss.backward()
        opt.step()
        out["auto_stepped"] = _layers(model)
        # one writer saves; every rank loads it onto a fresh sharded base (the offset rebuilt shard by shard)
        path = os.path.join(out_dir, "adapter")
        if rank == 0:
            lowrank.save_adapter(model, path)
        dist.barrier()
        out["reloaded"] = _layers(lowrank.load_adapter(_sharded(mesh), path))
        # a rank with another model: an error on both ranks, no hang (data-driven and data-free)
        for arm in ("lora_ga", "pissa"):
            try:
                lowrank.inject(_sharded(mesh, hidden=32 if rank == 0 else 64), _config(arm),
                               data=data[rank::WORLD] if arm != "pissa" else None, progress=False)
                out[f"mismatch_{arm}"] = "no error"
            except Exception as exc:  # noqa: BLE001
                out[f"mismatch_{arm}"] = f"{type(exc).__name__}: {exc}"
        # weights split on their second dimension (not FSDP2's default rows): refused by plan, on every rank,
        # before any batch is drawn or weight written
        from torch.distributed.tensor import Shard

        model = _sharded(mesh, placement=lambda p: Shard(1) if p.dim() == 2 else None)
        before = {n: p.to_local().clone() for n, p in model.named_parameters()}
        try:
            lowrank.inject(model, _config("lora_ga"), data=data[rank::WORLD], progress=False)
            out["columns"] = "no error"
        except Exception as exc:  # noqa: BLE001
            out["columns"] = f"{type(exc).__name__}: {exc}"
        out["columns_unchanged"] = not list(lowrank.adapted_layers(model)) and all(
            torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
        # in-place offsets (rollback="recompute") that overflow only in the last rows, which rank 1 holds: each rank
        # checks its own rows of every layer (nothing gathered) before any write; the verdict is agreed
        from lowrank.init.base import InitResult, Initializer

        @lowrank.register_initializer("overflow_in_last_rows", override=True)
        class Overflow(Initializer):
            offset = True

            def init_layer(self, ctx):
                B = ctx.randn(ctx.m, ctx.rank)
                B[-1] = 3e38  # finite, but s B A overflows float32 in that row
                return InitResult(A=10 + ctx.zeros(ctx.rank, ctx.n), B=B, offset=True)

        import lowrank.weights as weights

        gathered, real_gather = [], weights.gather
        weights.gather = lambda t: gathered.append(t.shape) or real_gather(t)  # weight_view's all-gather
        model = _sharded(mesh)
        before = {n: p.to_local().clone() for n, p in model.named_parameters()}
        try:
            lowrank.inject(model, lowrank.LoRAConfig(rank=2, targets=TARGETS, init="overflow_in_last_rows"),
                           progress=False, rollback="recompute")
            out["overflow"] = "no error"
        except Exception as exc:  # noqa: BLE001
            out["overflow"] = f"{type(exc).__name__}: {exc}"
        weights.gather = real_gather
        out["overflow_gathered"] = len(gathered)
        out["overflow_unchanged"] = not list(lowrank.adapted_layers(model)) and all(
            torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(tmp / "pg_init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(arm: str, data):
    model = lowrank.inject(tiny_llama(), _config(arm), data=data if arm != "pissa" else None, progress=False)
    return dict(lowrank.adapted_layers(model))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    assert (a - b).abs().max() <= rel * b.abs().max(), float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arm", list(ARMS))
def test_fsdp_init_equals_one_process_on_the_union(ranks, arm):
    single = _single(arm, batches("llama", 4, seed=1))
    W0 = {n: m.weight.detach() for n, m in tiny_llama().named_modules() if n in single}
    for name, layer in single.items():
        A1, B1, s = layer.A.detach(), layer.B.detach(), layer.scaling
        for r in ranks:
            got = r[arm][name]
            # singular vectors have arbitrary signs (G summed in another order): compare the subspaces
            _close(got["A"].T @ got["A"], A1.T @ A1)
            _close(got["B"] @ got["B"].T, B1 @ B1.T)
            # this rank's rows of the residual are W0 - s B0 A0 for the factors it holds
            _close(got["W"] + s * got["B"][got["rows"]] @ got["A"], W0[name][got["rows"]], 1e-5)
        assert torch.equal(ranks[0][arm][name]["A"], ranks[1][arm][name]["A"])  # bitwise identical factors
        assert torch.equal(ranks[0][arm][name]["B"], ranks[1][arm][name]["B"])
        assert ranks[0][arm][name]["rows"] != ranks[1][arm][name]["rows"]  # each rank wrote its own shard


def test_the_sketch_state_is_split_across_the_ranks(ranks):
    """On a sharded model each layer's sketch basis and sums live on one rank only (default ``shard_state``)."""
    layers = set(ranks[0]["lora_ga_sketch"])
    h0, h1 = ranks[0]["sketch_held"], ranks[1]["sketch_held"]
    assert len(h0) == len(h1) == 3  # the default 3 passes
    for a, b in zip(h0, h1):
        assert a and b and not set(a) & set(b) and set(a) | set(b) == layers, (a, b)


def test_the_statistics_pass_gathers_one_block_at_a_time_and_restores_fsdps_prefetch(ranks):
    for r in ranks:
        seen = r["gathered"]
        assert max(seen["default"]) == 2, seen  # FSDP's default: this block and the previous one (prefetched)
        assert seen["pass"] and max(seen["pass"]) == 1, seen  # lowrank's pass: one block at a time
        assert seen["restored"]


def test_in_place_offsets_give_the_same_bits(ranks):
    for r in ranks:
        for name, got in r["recompute"].items():
            for key in ("A", "B", "W"):
                assert torch.equal(got[key], r["lora_ga"][name][key]), (name, key)


def test_a_training_step_keeps_adapters_identical_and_equals_the_union_step(ranks):
    data = batches("llama", 4, seed=1)
    model = lowrank.inject(tiny_llama(), STEP, progress=False).train()
    single_B0 = {n: layer.B.detach().clone() for n, layer in lowrank.adapted_layers(model)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # the mean of the two ranks' mean losses: each rank's batch has the same number of tokens
    (0.5 * (model(**data[0]).loss + model(**data[1]).loss)).backward()
    opt.step()
    for name, layer in lowrank.adapted_layers(model):
        a, b = ranks[0]["stepped"][name], ranks[1]["stepped"][name]
        assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"])
        assert (a["B"] - single_B0[name]).abs().max() > 1e-5  # it moved
        _close(a["A"], layer.A.detach())
        _close(a["B"], layer.B.detach())


def test_inject_on_a_sharded_base_averages_the_adapters_gradients_without_replicate_adapters(ranks):
    """Forgetting ``replicate_adapters`` used to leave every rank with other adapters after one step (7.5e-5 apart)."""
    for r in ranks:
        assert r["hooks"] and set(r["hooks"]) == {1} and r["hooks_after_calls"] == r["hooks"], r["hooks_after_calls"]
    for name, a in ranks[0]["auto_stepped"].items():
        b = ranks[1]["auto_stepped"][name]
        assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"]), name
        assert torch.equal(a["B"], ranks[0]["stepped"][name]["B"]), name  # the explicit call's step, bit for bit


def test_save_on_one_rank_and_load_on_every_rank_onto_a_sharded_base(ranks):
    for r in ranks:
        for name, got in r["reloaded"].items():
            want = r["stepped"][name]
            assert torch.equal(got["A"], want["A"]) and torch.equal(got["B"], want["B"])
            assert torch.equal(got["W"], want["W"]), name  # the same offset shard, recomputed bit for bit


def test_a_rank_with_another_model_is_an_error_on_every_rank(ranks):
    for r in ranks:
        for arm in ("lora_ga", "pissa"):
            assert "rank 1 has other layers than rank 0" in r[f"mismatch_{arm}"], r[f"mismatch_{arm}"]


def test_a_weight_sharded_on_its_columns_is_refused_on_every_rank_and_the_model_is_unchanged(ranks):
    for r in ranks:
        assert r["columns"].startswith("TypeError: layer 'model.layers.0.self_attn.q_proj' has a DTensor weight placed"), \
            r["columns"]
        assert "Shard(dim=1)" in r["columns"] and "fully_shard" in r["columns"], r["columns"]
        assert r["columns_unchanged"]


def test_the_documented_torchrun_example_runs_and_ends_with_the_same_adapters_on_both_ranks(tmp_path):
    """``experiments/fsdp_init.py`` (the FSDP2 recipe of docs/scale-out.md): shard, inject, train, save, under torchrun."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "experiments.fsdp_init", "--hidden", "64", "--layers", "2", "--vocab", "97",
                          "--steps", "2", "--out", str(tmp_path / "adapter")], capture_output=True, text=True,
                         timeout=300, env=env, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr[-4000:]
    # (two processes share the pipe: match each rank's report wherever it sits, not line by line)
    lines = re.findall(r"rank (\d)/2 .*?base share (\d+) MiB.*?adapter checksum ([-+0-9.e]+\d)", run.stdout)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], run.stdout
    assert lines[0][2] == lines[1][2]  # the adapters, bit for bit (to 11 digits), after two data-parallel steps
    from experiments.fsdp_init import TARGETS, _model

    loaded = lowrank.load_adapter(_model("random", 64, 2, 97), str(tmp_path / "adapter"))  # the saved adapter loads
    assert len(list(lowrank.adapted_layers(loaded))) == 2 * len(TARGETS)


def test_an_in_place_offset_that_overflows_on_one_ranks_rows_is_an_error_on_every_rank(ranks):
    for r in ranks:
        assert r["overflow"].startswith("FloatingPointError") and "is not finite" in r["overflow"], r["overflow"]
        assert "model.layers.0.self_attn.q_proj" in r["overflow"], r["overflow"]  # the first layer, named
        assert r["overflow_unchanged"]
        assert r["overflow_gathered"] == 0  # no layer's weight was gathered to check it
