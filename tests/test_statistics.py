"""The statistics pass (``lowrank.init.collect``): each statistic against a float64 reference built
from the layer inputs themselves, padding masked, forward-only passes without backward, one pass for
several needs, nothing left behind, clear errors."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.init.collect import collect_statistics, input_svd

from .conftest import MODELS, Snapshot, batches, tiny_bert


def _padded(n: int = 3, seed: int = 0) -> list[dict]:
    """BERT batches whose sequences end in padding (attention_mask 0)."""
    out = batches("bert", n, seed=seed)
    for i, b in enumerate(out):
        b["attention_mask"] = b["attention_mask"].clone()
        b["attention_mask"][0, 5:] = 0
        b["attention_mask"][2, 7 - i:] = 0
    return out


def _targets(model, names):
    return {n: m for n, m in model.named_modules() if n.endswith(tuple(names))}


def _inputs(model, modules, data, *, mask=True) -> dict[str, torch.Tensor]:
    """Every layer's input rows over ``data`` in float64 (padding rows dropped), kept in full: the reference."""
    rows = {n: [] for n in modules}
    current = {}

    def hook(name):
        def fn(module, args, out):
            x = args[0].detach().double()
            m = current.get("mask")
            rows[name].append(x[m] if mask and m is not None else x.reshape(-1, x.shape[-1]))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for b in data:
                current["mask"] = b["attention_mask"].bool() if "attention_mask" in b else None
                model(**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def test_covariance_mean_and_rows_match_a_float64_reference_with_padding_masked():
    model, data = tiny_bert(), _padded()
    mods = _targets(model, ["query", "intermediate.dense"])
    stats = collect_statistics(model, mods, data, None, ("covariance",), progress=False)
    X = _inputs(model, mods, data)
    for name, x in X.items():
        assert int(stats[name]["rows"]) == x.shape[0] == 3 * 4 * 9 - (3 * 4 + 2 + 3 + 4)
        torch.testing.assert_close(stats[name]["covariance"].double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[name]["input_mean"].double(), x.mean(0), rtol=1e-5, atol=1e-6)


def test_without_masking_every_row_counts():
    model, data = tiny_bert(), _padded()
    mods = _targets(model, ["query"])
    stats = collect_statistics(model, mods, data, None, ("covariance",), progress=False, mask_padding=False)
    X = _inputs(model, mods, data, mask=False)
    for name, x in X.items():
        assert int(stats[name]["rows"]) == 3 * 4 * 9
        torch.testing.assert_close(stats[name]["covariance"].double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("centred", [False, True])
def test_input_svd_is_the_svd_of_the_input_rows(centred):
    model, data = tiny_bert(), _padded()
    mods = _targets(model, ["value"])
    stats = collect_statistics(model, mods, data, None, ("input_svd",), progress=False)
    for name, x in _inputs(model, mods, data).items():
        x = x - x.mean(0) if centred else x
        _, S_ref, Vh_ref = torch.linalg.svd(x, full_matrices=False)
        S, V = input_svd(stats[name], centred=centred)
        torch.testing.assert_close(S.double(), S_ref, rtol=1e-4, atol=1e-4 * S_ref[0].item())
        k = 6  # well-separated top directions: compare projections (signs are arbitrary)
        torch.testing.assert_close((V[:, :k] @ V[:, :k].T).double(), Vh_ref[:k].T @ Vh_ref[:k], rtol=0, atol=1e-4)


def test_forward_only_needs_run_without_grad_and_without_backward():
    model, data = tiny_bert(), _padded(2)
    grad_modes, backward_calls = [], []
    model.bert.embeddings.register_forward_hook(lambda *a: grad_modes.append(torch.is_grad_enabled()))
    model.classifier.weight.register_hook(lambda g: backward_calls.append(1))  # would fire on any backward
    collect_statistics(model, _targets(model, ["query"]), data, lowrank.default_loss, ("covariance", "input_svd"),
                       progress=False)
    assert grad_modes == [False, False] and backward_calls == []


def test_one_pass_for_several_needs_equals_separate_passes():
    data = batches("bert", 3)
    forwards = []
    model = tiny_bert()
    model.bert.embeddings.register_forward_hook(lambda *a: forwards.append(1))
    mods = _targets(model, ["query", "value"])
    both = collect_statistics(model, mods, data, None, ("gradient", "covariance"), progress=False)
    assert len(forwards) == 3  # one forward per batch for both statistics
    grad = collect_statistics(model, mods, data, None, ("gradient",), progress=False)
    cov = collect_statistics(model, mods, data, None, ("covariance",), progress=False)
    for n in mods:
        assert set(both[n]) == {"gradient", "covariance", "input_mean", "rows"}
        torch.testing.assert_close(both[n]["gradient"], grad[n]["gradient"], rtol=0, atol=0)
        torch.testing.assert_close(both[n]["covariance"], cov[n]["covariance"], rtol=0, atol=0)
    assert set(grad[next(iter(mods))]) == {"gradient"}  # exactly what was asked for


def test_nothing_left_behind_and_offload_agrees():
    model = tiny_bert()
    model.bert.encoder.layer[0].train()
    snap = Snapshot(model)
    rng = torch.get_rng_state()
    mods = _targets(model, ["query"])
    a = collect_statistics(model, mods, _padded(), None, ("covariance",), progress=False)
    b = collect_statistics(model, mods, _padded(), None, ("covariance",), progress=False, offload=True)
    snap.assert_unchanged()
    assert torch.equal(torch.get_rng_state(), rng)
    for m in model.modules():
        assert not [h for h in m._forward_hooks.values() if "_Pass." in getattr(h, "__qualname__", "")]
    for n in a:
        assert b[n]["covariance"].device.type == "cpu"
        torch.testing.assert_close(a[n]["covariance"], b[n]["covariance"], rtol=0, atol=0)


def test_unreached_layer_and_non_finite_inputs_are_named():
    model = tiny_bert()
    mods = _targets(model, ["query"])

    def first_layer_only(model, batch):
        return model.bert.encoder.layer[0](model.bert.embeddings(batch["input_ids"]))

    with pytest.raises(ValueError, match=r"does not reach 1 target layer.*never receive an input.*layer\.1\."):
        collect_statistics(model, mods, batches("bert", 1), first_layer_only, ("covariance",), progress=False)

    def poisoned(model, batch):
        x = model.bert.embeddings(batch["input_ids"]) * float("inf")
        return model.bert.encoder.layer[0](x)

    with pytest.raises(FloatingPointError, match=r"non-finite input statistics on batch 0 for layer "
                                                 r"'bert.encoder.layer.0.attention.self.query'"):
        collect_statistics(model, mods, batches("bert", 1), poisoned, ("covariance",), progress=False)
    with pytest.raises(ValueError, match="unknown statistics"):
        collect_statistics(model, mods, batches("bert", 1), None, ("activations",), progress=False)


def test_a_custom_initializer_declares_its_needs():
    @lowrank.register_initializer("test_input_pca", override=True)
    class InputPCA(lowrank.init.DataInitializer):
        """A from the top principal directions of the inputs, B = 0."""

        needs = ("input_svd",)

        def init_layer(self, ctx):
            _, V = ctx.input_svd(centred=True)
            return lowrank.InitResult(A=V[:, :ctx.rank].T.contiguous(), B=ctx.zeros(ctx.m, ctx.rank))

    try:
        assert InputPCA.uses_data
        factory, targets, _, _ = MODELS["llama"]
        model = lowrank.inject(factory(), lowrank.LoRAConfig(targets=targets, rank=2, init="test_input_pca",
                                                             init_options={"progress": False}),
                               data=batches("llama", 2), progress=False)
        for _, layer in lowrank.adapted_layers(model):
            torch.testing.assert_close(layer.A @ layer.A.T, torch.eye(2), rtol=0, atol=1e-5)

        class Bad(lowrank.init.DataInitializer):  # checked when built (a plug-in's statistic may come later)
            needs = ("hessian",)
            init_layer = InputPCA.init_layer

        with pytest.raises(ValueError, match="unknown statistics"):
            Bad()
    finally:
        lowrank.registry.INITIALIZERS.unregister("test_input_pca")


def test_wide_inputs_take_the_blocked_upper_triangle_path_exactly():
    from lowrank.init.collect import GRAM_BLOCK

    torch.manual_seed(0)
    n = GRAM_BLOCK + 300  # two blocks, one partial
    model = torch.nn.Sequential(torch.nn.Linear(n, 4))
    data = [torch.randn(3, 5, n) for _ in range(2)]
    stats = collect_statistics(model, {"0": model[0]}, data, None, ("covariance",), progress=False)
    x = torch.cat([b.reshape(-1, n) for b in data]).double()
    torch.testing.assert_close(stats["0"]["covariance"].double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)


class _InPlace(torch.nn.Module):
    """Two layers fed the same tensor object, changed in place between them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

    def forward(self, x):
        x = x.clone()
        y = self.a(x)
        x.mul_(2.0)
        return y.sum() + self.b(x).sum()


def test_an_input_changed_in_place_between_layers_is_not_reused():
    model = _InPlace()
    data = [torch.randn(4, 6) for _ in range(2)]
    stats = collect_statistics(model, {"a": model.a, "b": model.b}, data, None, ("covariance",), progress=False)
    x = torch.cat(data).double()
    torch.testing.assert_close(stats["a"]["covariance"].double(), x.T @ x / 8, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["b"]["covariance"].double(), 4 * x.T @ x / 8, rtol=1e-5, atol=1e-6)


def test_a_mean_that_dominates_the_spread_warns_for_centred_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(5, 2))
    data = [1e4 + torch.randn(50, 5, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = collect_statistics(model, {"0": model[0]}, data, None, ("input_svd",), progress=False)
    with pytest.warns(UserWarning, match="mean dominates their spread"):
        input_svd(stats["0"], centred=True)
    input_svd(stats["0"], centred=False)  # the raw second moment is fine


def test_a_new_statistic_is_one_registered_class_and_joins_the_same_pass():
    """A user's statistic (here the mean squared norm of the layer's input rows, padding masked) collected in one
    pass with the gradient: its value matches a float64 reference and the gradient is bitwise the one it gets
    alone; an initializer that needs it reads it from its context."""
    from lowrank.init.stats import Statistic

    @lowrank.register_statistic("test_input_energy")
    class InputEnergy(Statistic):
        """Mean squared norm of the input rows."""

        provides = ("input_energy",)

        def __init__(self, modules, device, offload=False):
            self.energy = {n: torch.zeros((), device=device) for n in modules}
            self.count = {n: torch.zeros((), device=device) for n in modules}
            self.sums = [self.energy, self.count]

        def on_input(self, name, inp):
            self.energy[name] += inp.memo("sq", lambda x: x.square().sum())
            self.count[name] += inp.rows.shape[0]

        def reached(self, name):
            return bool(self.count[name] > 0)

        def result(self, name, n_batches):
            return {"input_energy": self.energy[name] / self.count[name]}

    @lowrank.register_initializer("test_energy_scaled")
    class EnergyScaled(lowrank.init.DataInitializer):
        """Gaussian A divided by the root input energy, B = 0."""

        needs = ("test_input_energy",)

        def init_layer(self, ctx):
            A = torch.randn(ctx.rank, ctx.n, generator=ctx.generator) / ctx.stat("input_energy").sqrt()
            return lowrank.InitResult(A=A.to(ctx.device), B=ctx.zeros(ctx.m, ctx.rank))

    try:
        assert lowrank.registry.STATISTIC_REGISTRY.entry("test_input_energy").capabilities["uses_backward"] is False
        model = tiny_bert()
        mods = _targets(model, ["query"])
        data = _padded()
        both = collect_statistics(model, mods, data, None, ("gradient", "test_input_energy"), progress=False)
        alone = collect_statistics(model, mods, data, None, ("gradient",), progress=False)
        ref = _inputs(model, mods, data)
        for n in mods:
            x = ref[n]
            torch.testing.assert_close(both[n]["input_energy"].double(), x.square().sum() / x.shape[0], rtol=1e-5,
                                       atol=0)
            assert torch.equal(both[n]["gradient"], alone[n]["gradient"])
        cfg = lowrank.LoRAConfig(targets=["query"], rank=2, init="test_energy_scaled", init_options={"progress": False})
        injected = lowrank.inject(tiny_bert(), cfg, data=data, progress=False)
        layers = dict(lowrank.adapted_layers(injected))
        assert set(layers) == set(mods)
        for n, layer in layers.items():
            gen = torch.Generator().manual_seed(lowrank.init.layer_seed(cfg.seed, n))
            expected = torch.randn(2, layer.A.shape[1], generator=gen) / (ref[n].square().sum() / ref[n].shape[0]).sqrt()
            torch.testing.assert_close(layer.A.detach().double(), expected.double(), rtol=1e-4, atol=1e-6)
    finally:
        lowrank.registry.INITIALIZERS.unregister("test_energy_scaled")
        lowrank.registry.STATISTIC_REGISTRY.unregister("test_input_energy")


def test_data_needs_belong_to_the_data_protocol():
    """Declaring ``needs`` on a plain ``Initializer`` (no data pass to collect them) is refused with the fix."""
    with pytest.raises(TypeError, match="declares data needs but has no collect.*derive from lowrank.init.DataInitializer"):
        class Plain(lowrank.Initializer):
            needs = ("gradient",)

            def init_layer(self, ctx):
                raise AssertionError
    assert not hasattr(lowrank.get_initializer("pissa"), "collect")
    assert lowrank.get_initializer("lora_ga").uses_data and not hasattr(lowrank.Initializer, "needs")
