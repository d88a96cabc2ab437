"""Chains (``lowrank.chains``): COLA, RAC-LoRA, XGBLoRA run beside a training loop. A chain's model equals the base
plus the sum of its links' updates (float64), survives save/load and the PEFT export on the original base, a
COLA link started by LoRA-GA is LoRA-GA of the merged model, RAC-LoRA's step is the paper's projected step (Eq. 3),
XGBLoRA draws its blocks per round, and bad input is refused with the model unchanged."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.chains.xgblora import blocks
from tests.conftest import Snapshot, batches, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(rank=2, init="gaussian", dtype=torch.float64, **init_options):
    model = tiny_llama(dtype)
    opts = {"b_std": 0.0} if init == "gaussian" and not init_options else init_options
    cfg = lowrank.LoRAConfig(rank=rank, alpha=2 * rank, targets=TARGETS, init=init, init_options=opts, seed=1)
    return lowrank.inject(model, cfg, data=batches("llama", 2) if lowrank.get_initializer(init).uses_data else None,
                          progress=False)


def _train(model, run, steps, lr=0.05, opt=None, seed=0, before_step=None):
    data = batches("llama", steps, seed=seed)
    opt = opt or run.optimizer
    for i, b in enumerate(data):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        if before_step is not None:
            before_step(i)
        if run is not None:
            run.step()
    return model


def _logits(model, seed=5):
    with torch.no_grad():
        return model(**batches("llama", 1, seed=seed)[0]).logits


def test_the_three_chains_are_registered():
    assert lowrank.list_chains() == ["cola", "rac_lora", "xgblora"]
    assert lowrank.list_chains(freezes_factors=True) == ["rac_lora", "xgblora"]


def test_cola_with_one_link_is_plain_lora_bit_for_bit():
    plain, chained = _model(init="kaiming"), _model(init="kaiming")
    opt_p = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2)
    opt_c = torch.optim.AdamW([p for p in chained.parameters() if p.requires_grad], lr=1e-2)
    run = lowrank.start_chain(chained, "cola", optimizer=opt_c, total_steps=4, links=1)
    _train(plain, None, 4, opt=opt_p)
    _train(chained, run, 4)
    assert run.links == 1
    for (n, a), (_, b) in zip(lowrank.adapted_layers(plain), lowrank.adapted_layers(chained)):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.base_weight(), b.base_weight()), n


def test_a_chain_is_the_base_plus_the_sum_of_its_links_and_reloads_on_the_original_base(tmp_path):
    """COLA, 3 links of 2 SGD steps: the model's weights are W0 + s sum_k B_k A_k + s B A (float64); the record
    holds the links at rank r x 2; save/load onto the original model and PEFT's load of the export give the same
    outputs; the optimizer's state is reset at each knot."""
    model = _model(init="kaiming")
    W0 = {n: layer.base_weight().clone() for n, layer in lowrank.adapted_layers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run = lowrank.start_chain(model, "cola", optimizer=opt, total_steps=6, links=3)
    assert run.knots == [2, 4]
    links = {n: [] for n in W0}
    states = []

    def record(i):
        if i + 1 in run.knots:  # the link about to be merged
            for n, layer in lowrank.adapted_layers(model):
                links[n].append((layer.A.detach().clone(), layer.B.detach().clone()))

    data = batches("llama", 6, seed=0)
    for i, b in enumerate(data):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        record(i)
        if run.step():
            states.append(sum(len(opt.state[p]) for layer in dict(lowrank.adapted_layers(model)).values()
                              for p in layer.factors()))
    assert run.links == 3 and states == [0, 0]  # reset: no moments left for the factors
    for n, layer in lowrank.adapted_layers(model):
        s = layer.scaling
        want = W0[n] + s * sum(B @ A for A, B in links[n]) + s * layer.B @ layer.A
        got = layer.base_weight() + s * layer.B @ layer.A
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert layer.A0.shape == (2 * layer.rank, layer.d_in)  # two links folded into the record
        torch.testing.assert_close(layer.base_weight(), W0[n] - s * layer.B0 @ layer.A0, rtol=1e-12, atol=1e-12)
    want = _logits(model)
    lowrank.save_adapter(model, tmp_path / "adapter")
    reloaded = lowrank.load_adapter(tiny_llama(torch.float64), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), want, rtol=1e-10, atol=1e-10)
    peft = pytest.importorskip("peft")
    lowrank.peft.export(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(torch.float64), tmp_path / "peft")
    torch.testing.assert_close(_logits(theirs), want, rtol=1e-5, atol=1e-5)


def test_cola_links_started_by_lora_ga_are_lora_ga_of_the_merged_model():
    data = batches("llama", 2, seed=3)
    model = _model(init="kaiming")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run = lowrank.start_chain(model, "cola", optimizer=opt, total_steps=4, links=2, data=data,
                              init="lora_ga", init_options={"svd": "full", "progress": False})
    _train(model, run, 2, opt=opt)
    assert run.links == 2
    merged = tiny_llama(torch.float64)  # the merged model as a plain model: W0 + s B1 A1 for each layer
    with torch.no_grad():
        for n, layer in lowrank.adapted_layers(model):
            w = layer.base_weight() + layer.scaling * layer.B @ layer.A  # the new link's offset is inside the base
            merged.get_submodule(n).weight.copy_(w)
    fresh = lowrank.inject(merged, lowrank.LoRAConfig(rank=2, alpha=4, targets=TARGETS, init="lora_ga", seed=1,
                                                      init_options={"svd": "full", "progress": False}),
                           data=data, progress=False)
    for (n, a), (_, b) in zip(lowrank.adapted_layers(model), lowrank.adapted_layers(fresh)):
        # the same singular subspaces (signs of singular vectors are arbitrary)
        torch.testing.assert_close(a.A.T @ a.A, b.A.T @ b.A, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(a.B @ a.B.T, b.B @ b.B.T, rtol=1e-6, atol=1e-8)


def test_rac_lora_freezes_a_fresh_sketch_per_link_and_steps_as_the_projected_gradient():
    """``train="A"``, orthogonal sketch, one SGD step per link: ``W <- W - lr s^2 H_B grad f(W)`` with
    ``H_B = B_S B_S^T`` (Eq. 3), against the float64 gradient of the merged model."""
    model = _model(init="kaiming")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    run = lowrank.start_chain(model, "rac_lora", optimizer=opt, total_steps=3, links=3, sketch="orthogonal")
    layers = dict(lowrank.adapted_layers(model))
    sketches = []
    for b in batches("llama", 3, seed=7):
        W = {n: layer.base_weight().clone() for n, layer in layers.items()}
        Bs = {n: layer.B.detach().clone() for n, layer in layers.items()}
        sketches.append(Bs)
        assert all(not layer.B.requires_grad and layer.A.requires_grad and not layer.A.any() for layer in layers.values())
        # the gradient of the loss at the merged weights (the base itself: A = 0)
        ref = tiny_llama(torch.float64)
        with torch.no_grad():
            for n, w in W.items():
                ref.get_submodule(n).weight.copy_(w)
        ref(**b).loss.backward()
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        for n, layer in layers.items():
            assert torch.equal(layer.B, Bs[n])  # the frozen factor took no update
            H = Bs[n] @ Bs[n].T
            torch.testing.assert_close(H @ H, H, rtol=1e-10, atol=1e-10)  # a projection
            step = layer.scaling * layer.B @ layer.A
            want = -0.5 * layer.scaling ** 2 * H @ ref.get_submodule(n).weight.grad
            torch.testing.assert_close(step, want, rtol=1e-8, atol=1e-12)
        run.step()
    # a fresh sketch per link
    n = TARGETS[0]
    name = next(k for k in sketches[0] if k.endswith(n))
    assert not torch.allclose(sketches[0][name], sketches[1][name])


def test_rac_lora_trains_b_with_a_gaussian_frozen_a_and_keeps_the_optimizer_state_by_default():
    model = _model(init="kaiming", dtype=torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    run = lowrank.start_chain(model, "rac_lora", optimizer=opt, total_steps=4, links=2, train="B", std=0.5)
    layer = dict(lowrank.adapted_layers(model))[f"model.layers.0.self_attn.{TARGETS[0]}"]
    assert not layer.A.requires_grad and layer.B.requires_grad and not layer.B.any()
    assert abs(float(layer.A.std()) - 0.5) < 0.1
    A1 = layer.A.detach().clone()
    _train(model, run, 2, opt=opt)
    assert run.links == 2 and not torch.equal(layer.A, A1) and not layer.B.any()
    assert len(opt.state[layer.B]) > 0  # kept (the authors' code keeps one AdamW across links)
    assert layer.A0.shape[0] == layer.rank  # the first link is in the record (B A of link 1)


def test_xgblora_draws_its_blocks_per_round_and_trains_rank_1_boosters_there():
    model = _model(rank=1, init="kaiming")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run = lowrank.start_chain(model, "xgblora", optimizer=opt, total_steps=6, links=3, layers=1)
    layers = dict(lowrank.adapted_layers(model))
    groups = blocks(list(layers))
    assert [len(g) for g in groups] == [3, 3]  # tiny Llama: 2 blocks of (q, v, down)
    drawn = []
    for i, b in enumerate(batches("llama", 6, seed=2)):
        active = {n for n, layer in layers.items() if layer.A.requires_grad}
        assert active in [set(g) for g in groups]  # exactly one whole block trains this round
        for n, layer in layers.items():
            if n not in active:
                assert not layer.A.any() and not layer.B.any() and not layer.B.requires_grad
        if i % 2 == 0:
            drawn.append(frozenset(active))
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        run.step()
    assert run.links == 3 and len(drawn) == 3
    other = _model(rank=1, init="kaiming")  # the same seed draws the same first block
    lowrank.start_chain(other, "xgblora", optimizer=torch.optim.SGD(lowrank.trainable_parameters(other).values(), lr=1),
                        total_steps=6, links=3, layers=1)
    assert {n for n, layer in lowrank.adapted_layers(other) if layer.A.requires_grad} == drawn[0]
    with pytest.raises(ValueError, match=r"xgblora trains rank-1 boosters, but layer '.*' has rank 2: inject with "
                                         r"rank=1"):
        lowrank.start_chain(_model(rank=2), "xgblora", optimizer=opt, total_steps=6)


@pytest.mark.parametrize("options,message", [
    ({"link_steps": 6}, r"link_steps=6 is not shorter than the run \(6 steps\)"),
    ({"links": 7}, r"links=7 is more than the run's 6 steps"),
    ({"links": 2, "link_steps": 2}, "give links"),
    ({"links": 0}, r"invalid links=0"),
    ({"init": "eva"}, r"initializer 'eva' chooses ranks"),
    ({"init": "lora_ga"}, r"'lora_ga' is data-driven: pass data="),
])
def test_bad_chain_options_are_refused_before_anything_changes(options, message):
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=message):
        lowrank.start_chain(model, "cola", optimizer=opt, total_steps=6, **options)
    snap.assert_unchanged()


def test_a_merged_model_a_dora_adapter_and_a_transforming_preconditioner_are_refused():
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    lowrank.merge(model)
    with pytest.raises(ValueError, match="is merged; call lowrank.unmerge"):
        lowrank.start_chain(model, "cola", optimizer=opt, total_steps=6)
    dora = lowrank.inject(tiny_llama(), lowrank.LoRAConfig(rank=2, targets=TARGETS, adapter="dora"))
    with pytest.raises(ValueError, match="'dora' adapter, whose update is not s B A"):
        lowrank.start_chain(dora, "cola", optimizer=opt, total_steps=6)
    model = _model()
    popt = lowrank.optim.PreconditionedOptimizer(model, "sgd", "riemannian", lr=0.1)
    with pytest.raises(ValueError, match="freezes factors within a link, but preconditioner"):
        lowrank.start_chain(model, "rac_lora", optimizer=popt, total_steps=6, links=2)
    with pytest.raises(ValueError, match="holds none of the adapters' factors"):
        lowrank.start_chain(model, "cola", optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1),
                            total_steps=6)


def test_a_knot_that_fails_puts_everything_back():
    @lowrank.register_initializer("fails_at_knots", override=True)
    class Fails(lowrank.Initializer):
        """Fails (a probe)."""

        def init_layer(self, ctx):
            raise RuntimeError("probe failure")

    try:
        model = _model(init="kaiming")
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        run = lowrank.start_chain(model, "cola", optimizer=opt, total_steps=2, links=2, init="fails_at_knots")
        model(**batches("llama", 1)[0]).loss.backward()
        opt.step()
        opt.zero_grad()
        snap = Snapshot(model)
        records = {n: (layer.A0, layer.B0) for n, layer in lowrank.adapted_layers(model)}
        with pytest.raises(RuntimeError, match="probe failure"):
            run.step()
        snap.assert_unchanged()
        assert all(layer.A0 is records[n][0] for n, layer in lowrank.adapted_layers(model))
    finally:
        lowrank.registry.INITIALIZERS.unregister("fails_at_knots")


def test_the_trainer_callback_runs_the_chain():
    pytest.importorskip("accelerate")
    from datasets import Dataset
    from transformers import TrainingArguments

    from lowrank.hf import ChainCallback, LowRankTrainer

    rows = [{k: v[0].tolist() for k, v in b.items()} for b in batches("llama", 8, bsz=1)]
    args = TrainingArguments(output_dir="/tmp/lowrank-chain-trainer", max_steps=6, per_device_train_batch_size=1,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = ChainCallback("cola", links=3)
    trainer = LowRankTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(rows),
                             lowrank_config=lowrank.LoRAConfig(rank=2, targets=TARGETS), callbacks=[callback])
    trainer.train()
    assert callback.run.links == 3 and callback.run.steps == 6
    layer = next(layer for _, layer in lowrank.adapted_layers(trainer.model))
    assert layer.A0.shape[0] == 2 * layer.rank


def test_the_documented_chain_of_ones_own_registers_and_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "chains.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if 'register_chain("alternate")' in b]
    try:
        exec(compile(block, "docs/chains.md", "exec"), {})
        model = _model(init="kaiming")
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        run = lowrank.start_chain(model, "alternate", optimizer=opt, total_steps=4)
        layers = [layer for _, layer in lowrank.adapted_layers(model)]
        trained = []
        for b in batches("llama", 4):
            trained.append([layer.B.requires_grad for layer in layers])
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
            run.step()
        even, odd = [i % 2 == 0 for i in range(len(layers))], [i % 2 == 1 for i in range(len(layers))]
        assert trained == [even, odd, even, odd] and run.links == 4
        assert all(layer.A0 is not None for layer in layers)  # every layer had a link merged
    finally:
        lowrank.registry.CHAINS.unregister("alternate")
