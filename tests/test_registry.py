"""Registries: registration, lookup with suggestions, listing, duplicates, entry-point plugins."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

import pytest

import lowrank
from lowrank import registry


@pytest.mark.parametrize("package,reg,base", [("lowrank.init", registry.INITIALIZERS, "Initializer"),
                                              ("lowrank.optim", registry.PRECONDITIONERS, "Preconditioner"),
                                              ("lowrank.adapters", registry.ADAPTERS, "Adapter"),
                                              ("lowrank.init.stats", registry.STATISTIC_REGISTRY, "Statistic")])
def test_every_plugin_class_of_a_package_is_registered_without_a_list(package, reg, base):
    """Discovery: each module of the package is imported; every concrete plug-in class defined in it is listed."""
    import importlib
    import inspect
    import pkgutil

    pkg = importlib.import_module(package)
    root = getattr(lowrank, base, None) or getattr(pkg, base)
    defined = {cls for info in pkgutil.iter_modules(pkg.__path__)
               for _, cls in inspect.getmembers(importlib.import_module(f"{package}.{info.name}"), inspect.isclass)
               if issubclass(cls, root) and cls.__module__.startswith(package) and vars(cls).get("registry_name", "?") != "?"
               and cls is not lowrank.optim.Chain}  # a composition of registered preconditioners, not one itself
    assert defined and {c.registry_name for c in defined} <= set(reg.list())
    assert lowrank.get_adapter("lora") is lowrank.LoRALayer


def test_entries_carry_capabilities_and_lists_filter_on_them():
    for name in lowrank.list_initializers():
        caps = registry.INITIALIZERS.entry(name).capabilities
        cls = lowrank.get_initializer(name)
        assert caps["uses_data"] == cls.uses_data and caps["adapter_kinds"] == tuple(cls.adapter_kinds)
        with pytest.raises(TypeError):
            caps["uses_data"] = not caps["uses_data"]  # frozen
    data = lowrank.list_initializers(uses_data=True)
    assert data and all(lowrank.get_initializer(n).uses_data for n in data)
    assert set(data) | set(lowrank.list_initializers(uses_data=False)) == set(lowrank.list_initializers())
    latent = lowrank.list_initializers(adapter_kind="latent")
    assert latent and all("latent" in lowrank.get_initializer(n).adapter_kinds for n in latent)
    assert lowrank.list_initializers("lora_*", uses_data=True) == [n for n in data if n.startswith("lora_")]
    assert all(lowrank.get_adapter(n).kind == "factors" for n in lowrank.list_adapters(kind="factors"))
    stateful = set(lowrank.list_preconditioners(stateful=True))
    assert stateful and all((lowrank.get_preconditioner(n).init_state is not lowrank.Preconditioner.init_state)
                            == (n in stateful) for n in lowrank.list_preconditioners())
    with pytest.raises(ValueError, match=r"unknown initializer capability filter\(s\) \['offsets'\]"):
        lowrank.list_initializers(offsets=True)


def test_unknown_name_suggests_closest_and_how_to_list():
    with pytest.raises(KeyError) as err:
        lowrank.get_initializer("kaimng")
    msg = str(err.value)
    assert "'kaiming'" in msg and "lowrank.list_initializers()" in msg
    with pytest.raises(KeyError, match="list_preconditioners"):
        lowrank.get_preconditioner("nothing-like-it")


def test_list_filters_with_wildcards_sorted():
    reg = registry.Registry("thing")
    for name in ("b_two", "a_one", "b_one"):
        reg.register(name, object())
    assert reg.list() == ["a_one", "b_one", "b_two"]
    assert reg.list("b_*") == ["b_one", "b_two"]
    assert reg.list("*", exclude="*_one") == ["b_two"]


def test_duplicate_is_an_error_unless_override():
    reg = registry.Registry("thing")
    reg.register("x", 1)
    with pytest.raises(ValueError, match="already registered.*override=True"):
        reg.register("x", 2)
    reg.register("x", 3, override=True)
    assert reg.get("x") == 3
    with pytest.raises(ValueError, match="invalid thing name"):
        reg.register(" x", 4)


def test_register_a_new_initializer_in_a_few_lines():
    @lowrank.register_initializer("test_const")
    class Const(lowrank.Initializer):
        """A constant init for the test."""

        @dataclass(frozen=True)
        class Options:
            value: float = 0.5

        def init_layer(self, ctx):
            return lowrank.InitResult(A=ctx.zeros(ctx.rank, ctx.n) + self.options.value, B=ctx.zeros(ctx.m, ctx.rank))

    try:
        assert lowrank.get_initializer("test_const") is Const
        assert registry.INITIALIZERS.entry("test_const").description == "A constant init for the test."
        assert Const(value=2.0).options.value == 2.0
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['valu'\].*valid options: \['value'\]"):
            Const(valu=2.0)
        with pytest.raises(ValueError, match="already registered"):
            lowrank.register_initializer("test_const")(Const)
    finally:
        registry.INITIALIZERS.unregister("test_const")
    assert "test_const" not in lowrank.list_initializers()


def test_entry_point_plugins_load_lazily(monkeypatch):
    calls = []

    def plugin():
        calls.append(1)
        registry.INITIALIZERS.register("plugin_init", lowrank.get_initializer("kaiming"), override=True)

    def broken():
        raise RuntimeError("boom")

    class EP:
        def __init__(self, name, fn):
            self.name, self.value, self._fn = name, f"pkg:{name}", fn

        def load(self):
            return self._fn

    def fake_entry_points(group):
        assert group == "lowrank.plugins"
        return [EP("good", plugin), EP("bad", broken)]

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert calls == []  # nothing loads at import or registration time
    try:
        with pytest.warns(UserWarning, match="plugin 'bad'.*boom"):
            assert "plugin_init" in lowrank.list_initializers()
        lowrank.get_initializer("plugin_init")
        assert calls == [1]  # loaded once
    finally:
        registry.INITIALIZERS.unregister("plugin_init")


def test_names_that_differ_only_in_case_are_refused_and_unregister_takes_any_case():
    @lowrank.register_initializer("case_probe")
    class Probe(lowrank.get_initializer("kaiming")):
        """A probe."""
    try:
        with pytest.raises(ValueError, match="differs from the registered 'case_probe' only in case"):
            lowrank.register_initializer("Case_Probe", Probe)
    finally:
        registry.INITIALIZERS.unregister("CASE_PROBE")
    assert "case_probe" not in lowrank.list_initializers()
