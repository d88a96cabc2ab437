"""The sketched gradient estimate (``lowrank.init.sketch``): exact on gradients of low rank, close to the
dense estimate on real ones, never a dense ``G``, and clear errors for what a sketch cannot do."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank import LoRAConfig
from lowrank.init.sketch import sketch_gradient_svd
from lowrank.theory import alignment

from .conftest import Snapshot, batches, tiny_bert


class TwoLayer(torch.nn.Module):
    """``y = W2 W1 x``: the gradient of ``W1`` over ``T`` tokens has rank <= min(T, d)."""

    def __init__(self, n=40, h=30, m=20):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = torch.nn.Linear(n, h, bias=False), torch.nn.Linear(h, m, bias=False)

    def forward(self, x):
        return self.l2(self.l1(x))


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _dense_G(model, data):
    return lowrank.init.estimate_gradients(model, {"l1": model.l1, "l2": model.l2}, data, _loss, progress=False)


@pytest.mark.parametrize("passes,krylov", [(1, False), (2, False), (3, False), (3, True), (4, True)])
def test_a_gradient_of_rank_below_the_sketch_is_recovered_exactly(passes, krylov):
    model = TwoLayer()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(1, 3, 40, generator=g), torch.randn(1, 3, 20, generator=g)) for _ in range(2)]  # 6 tokens
    G = _dense_G(model, data)
    out = sketch_gradient_svd(model, {"l1": model.l1, "l2": model.l2}, data, _loss, k={"l1": 4, "l2": 4},
                              sketch_size={"l1": 8, "l2": 8}, passes=passes, krylov=krylov, progress=False)
    for name, (U, S, V) in out.items():
        U0, S0, Vh0 = torch.linalg.svd(G[name].double(), full_matrices=False)
        torch.testing.assert_close(S.double(), S0[:4], rtol=1e-4, atol=1e-6 * S0[0].item())
        torch.testing.assert_close((U @ U.T).double(), U0[:, :4] @ U0[:, :4].T, rtol=0, atol=1e-4)
        torch.testing.assert_close((V @ V.T).double(), Vh0[:4].T @ Vh0[:4], rtol=0, atol=1e-4)


def _lora_ga(data, **opts):
    cfg = LoRAConfig(targets=["query", "value", "dense"], rank=2, scaling="rslora", init="lora_ga",
                     init_options={"progress": False, **opts})
    return dict(lowrank.adapted_layers(lowrank.inject(tiny_bert(), cfg, data=data, progress=False)))


def test_the_default_sketch_keeps_the_first_step_near_the_eckart_young_floor():
    """On real (full-rank) gradients: the first step of LoRA-GA from the default sketch against ``G`` itself,
    as the excess of its relative error over the rank-2r floor; the dense estimate sits at the floor."""
    data = batches("bert", 3)
    model = tiny_bert()
    mods = {n: m for n, m in model.named_modules() if n.endswith(("query", "value", "dense"))}
    G = lowrank.init.estimate_gradients(model, mods, data, lowrank.default_loss, progress=False)
    excess = {}
    for label, opts in (("dense", {}), ("sketch", {"estimator": "sketch"})):
        layers = _lora_ga(data, **opts)
        excess[label] = sorted(alignment(*layers[n].factors(), layers[n].scaling, G[n]).excess for n in G)
    assert max(excess["dense"]) < 1e-5
    # measured: median 4e-12, max 6e-5 (3 passes, sketch width 8r = 16 of these 32-wide layers)
    assert excess["sketch"][len(G) // 2] < 1e-6 and max(excess["sketch"]) < 1e-3, excess["sketch"]


def test_the_sketch_never_forms_a_dense_accumulator(monkeypatch):
    """Every accumulator of the sketched pass is thin, (d, k) with k = 4 x 2 triplets here: never (d_out, d_in)."""
    from lowrank.init import collect

    shapes = []
    real = collect.collect_statistics

    def spy(*args, gradient_sink=None, **kw):
        assert gradient_sink is not None
        shapes.extend(tuple(t.shape) for kind in gradient_sink.accumulators for t in kind.values())
        return real(*args, gradient_sink=gradient_sink, **kw)

    monkeypatch.setattr("lowrank.init.sketch.collect_statistics", spy)
    model = TwoLayer(n=64, h=48, m=32)
    data = [(torch.randn(2, 5, 64), torch.randn(2, 5, 32))]
    sketch_gradient_svd(model, {"l1": model.l1, "l2": model.l2}, data, _loss, k={"l1": 2, "l2": 2}, passes=3,
                        progress=False)
    assert shapes and all(min(s) <= 8 for s in shapes) and (48, 64) not in shapes and (32, 48) not in shapes


@pytest.mark.parametrize("passes", [3, 4])
def test_the_krylov_space_approximates_at_least_as_well_as_its_last_block(passes):
    """With ``krylov`` the final subspace contains the last block's, so the best rank-k approximation of ``G``
    within it is no worse (Frobenius), layer by layer, on full-rank gradients."""
    data = batches("bert", 2)
    model = tiny_bert()
    mods = {n: m for n, m in model.named_modules() if n.endswith(("query", "dense"))}
    G = lowrank.init.estimate_gradients(model, mods, data, lowrank.default_loss, progress=False)
    err = {}
    for krylov in (False, True):
        out = sketch_gradient_svd(model, mods, data, lowrank.default_loss, k=dict.fromkeys(mods, 4),
                                  sketch_size=dict.fromkeys(mods, 6), passes=passes, krylov=krylov, progress=False)
        err[krylov] = {n: torch.linalg.norm(G[n].double() - (U * S).double() @ V.T.double()).item()
                       for n, (U, S, V) in out.items()}
    for n in G:
        assert err[True][n] <= err[False][n] * (1 + 1e-5), (n, err)
    assert any(err[True][n] < err[False][n] * (1 - 1e-3) for n in G), err  # and it is not the same subspace


def test_a_right_side_pass_holds_x_times_its_basis_not_the_layer_input(monkeypatch):
    """The pass applying ``G`` to a basis needs only ``x @ basis`` (``T x k``) at the backward: the layer input
    (``T x d_in``) is not held through the backward; the left side's pass needs ``x`` itself."""
    from lowrank.init import sketch

    held = []
    real = sketch._Sketches.hold

    def spy(self, name, x):
        out = real(self, name, x)
        held.append(("right" if self.left is None else "left", tuple(x.shape), tuple(out.shape)))
        return out

    monkeypatch.setattr(sketch._Sketches, "hold", spy)
    model = TwoLayer(n=64, h=48, m=32)
    data = [(torch.randn(2, 5, 64), torch.randn(2, 5, 32))]
    sketch_gradient_svd(model, {"l1": model.l1, "l2": model.l2}, data, _loss, k={"l1": 2, "l2": 2},
                        sketch_size={"l1": 8, "l2": 8}, passes=3, progress=False)
    assert {side for side, _, _ in held} == {"right", "left"}
    for side, x_shape, out_shape in held:
        assert out_shape == ((10, 8) if side == "right" else x_shape), held


def test_data_that_changes_between_passes_is_named():
    model = TwoLayer()
    calls = {"n": 0}

    def drifting(model, batch):
        calls["n"] += 1
        return _loss(model, batch) * (1.0 if calls["n"] <= 2 else 1.5)  # pass 2 sees another loss

    data = [(torch.randn(1, 3, 40), torch.randn(1, 3, 20)) for _ in range(2)]
    with pytest.raises(ValueError, match=r"batch 0 gave loss .* in pass 2 of the sketch but .* in the first"):
        sketch_gradient_svd(model, {"l1": model.l1}, data, drifting, k={"l1": 2}, passes=2, progress=False)
    with pytest.raises(ValueError, match="data is a one-shot iterator .*pass re-iterable data"):
        sketch_gradient_svd(model, {"l1": model.l1}, iter(data), _loss, k={"l1": 2}, passes=2, progress=False)


def test_bad_sketch_requests_are_clear_errors_and_the_model_is_unchanged():
    data = batches("bert", 2)
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"sketch_size=3 is smaller than the 4 singular triplets 'lora_ga' needs"):
        lowrank.inject(model, LoRAConfig(targets=["query"], rank=2, scaling="rslora", init="lora_ga",
                                         init_options={"estimator": "sketch", "sketch_size": 3, "progress": False}),
                       data=data, progress=False)
    snap.assert_unchanged()
    with pytest.raises(ValueError, match="invalid passes=0"):
        LoRAConfig(targets=["query"], init="lora_ga", init_options={"estimator": "sketch", "passes": 0})
    with pytest.raises(ValueError, match="'gora' needs the dense gradient G"):
        LoRAConfig(targets=["query"], init="gora", init_options={"estimator": "sketch"})
    with pytest.raises(ValueError, match="sketch_size, passes and krylov apply to estimator='sketch'"):
        LoRAConfig(targets=["query"], init="lora_ga", init_options={"passes": 2})
    with pytest.raises(ValueError, match="sketch_size, passes and krylov apply to estimator='sketch'"):
        LoRAConfig(targets=["query"], init="lora_ga", init_options={"krylov": True})
    with pytest.raises(ValueError, match="option krylov='yes' of initializer 'lora_ga' must be true or false"):
        LoRAConfig(targets=["query"], init="lora_ga", init_options={"estimator": "sketch", "krylov": "yes"})
    with pytest.raises(ValueError, match="shard_state='yes'"):
        LoRAConfig(targets=["query"], init="lora_ga", init_options={"estimator": "sketch", "shard_state": "yes"})
    with pytest.raises(ValueError, match="shard_state applies to the sketch"):
        LoRAConfig(targets=["query"], init="lora_ga", init_options={"estimator": "dense", "shard_state": True})
    with pytest.raises(ValueError, match="train_mode=True .dropout. changes it"):
        lowrank.inject(model, LoRAConfig(targets=["query"], rank=2, scaling="rslora", init="lora_ga",
                                         init_options={"estimator": "sketch", "train_mode": True, "progress": False}),
                       data=data, progress=False)
    snap.assert_unchanged()


def test_lora_one_from_a_sketch_matches_dense():
    data = batches("bert", 3)
    out = {}
    for label, opts in (("dense", {}), ("sketch", {"estimator": "sketch", "passes": 4, "sketch_size": 8})):
        cfg = LoRAConfig(targets=["query"], rank=2, init="lora_one", init_options={"progress": False, **opts})
        out[label] = dict(lowrank.adapted_layers(lowrank.inject(tiny_bert(), cfg, data=data, progress=False)))
    for n, d in out["dense"].items():
        s = out["sketch"][n]
        ref = d.B.detach() @ d.A.detach()
        torch.testing.assert_close(s.B.detach() @ s.A.detach(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_auto_estimator_is_dense_for_small_models_and_sketches_beyond_the_threshold(monkeypatch):
    import lowrank.init.gradient as gradient

    data = batches("bert", 2)

    def layers(**opts):
        cfg = LoRAConfig(targets=["query", "value"], rank=2, scaling="rslora", init="lora_ga",
                         init_options={"progress": False, **opts})
        return {n: (l.A.detach(), l.B.detach()) for n, l in
                lowrank.adapted_layers(lowrank.inject(tiny_bert(), cfg, data=data, progress=False))}

    auto, dense, sketch = layers(), layers(estimator="dense"), layers(estimator="sketch")
    assert all(torch.equal(auto[n][0], dense[n][0]) and torch.equal(auto[n][1], dense[n][1]) for n in auto)
    monkeypatch.setattr(gradient, "DENSE_G_MAX_BYTES", 1000)  # below one 32x32 float32 G
    auto = layers()
    assert all(torch.equal(auto[n][0], sketch[n][0]) and torch.equal(auto[n][1], sketch[n][1]) for n in auto)
    mods = {n: m for n, m in tiny_bert().named_modules() if n.endswith("query")}
    peft_variant = LoRAConfig(targets=["query"], rank=2, init="lora_ga", init_options={"variant": "peft"})
    assert peft_variant.make_initializer().estimator_for(mods) == "dense"  # PEFT's factorizes the dense G
    from lowrank.init.lora_ga import LoRAGA

    @lowrank.register_initializer("lab_lora_ga")
    class LabLoRAGA(LoRAGA):
        """A user's LoRA-GA variant: the estimator choice is declared by the method (``sketches``), not by name."""

    try:
        lab = LoRAConfig(targets=["query"], rank=2, init="lab_lora_ga", init_options={"variant": "peft"})
        assert lab.make_initializer().estimator_for(mods) == "dense"
        lab = LoRAConfig(targets=["query"], rank=2, init="lab_lora_ga")
        assert lab.make_initializer().estimator_for(mods) == "sketch"  # DENSE_G_MAX_BYTES is still 1000 here
    finally:
        lowrank.registry.INITIALIZERS.unregister("lab_lora_ga")
