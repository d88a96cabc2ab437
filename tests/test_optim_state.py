"""Preconditioner state as values: ``update`` returns the next state (``Update``) and never writes into the one it
gets; a chain holds its parts' states nested (saved flat, as ``"<i>.<key>"``); the state a refused step computed is
dropped."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import lowrank
from lowrank.optim import PreconditionedOptimizer, Update
from lowrank.optim.lora_rite import RiteState
from lowrank.optim.state import ReadOnlyState, flatten, unflatten
from tests.conftest import batches, tiny_bert


def _model():
    model = tiny_bert()
    lowrank.inject(model, lowrank.LoRAConfig(rank=2, alpha=4, targets=["query"], init="pissa"), progress=False)
    return model.train()


def _steps(model, opt, n=2):
    for b in batches("bert", n):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()


class Counting(lowrank.Preconditioner):
    """Scales grad_B by 1 / (1 + steps so far), a state it carries as a value."""

    @dataclass(frozen=True)
    class Options:
        pass

    def init_state(self, A, B):
        return {"count": torch.zeros(())}

    def update(self, grad_A, grad_B, A, B, scaling, state):
        return Update(grad_A, grad_B / (1 + state["count"]), {"count": state["count"] + 1})


class InPlace(Counting):
    """The old protocol: writes into the state it is given."""

    def update(self, grad_A, grad_B, A, B, scaling, state):
        state["count"] = state["count"] + 1
        return grad_A, grad_B


@pytest.fixture(autouse=True)
def _plugins():
    """Registered for this module's tests only (the docs' generated tables list the registries)."""
    lowrank.register_preconditioner("test_counting", Counting)
    lowrank.register_preconditioner("test_in_place", InPlace)
    yield
    lowrank.registry.PRECONDITIONERS.unregister("test_counting")
    lowrank.registry.PRECONDITIONERS.unregister("test_in_place")


def test_a_chain_nests_real_states_and_saves_them_flat():
    model = _model()
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner=["lora_plus", "lora_rite", "test_counting"],
                                  lr=1e-3)
    _steps(model, opt, 3)
    name = next(iter(opt.layer_state))
    st = opt.layer_state[name]
    assert set(st) == {"0", "1", "2"} and dict(st["0"]) == {}
    assert not any(isinstance(v, ReadOnlyState) for v in st.values())  # an unchanged part's state is carried, not a view
    assert isinstance(st["1"], RiteState) and int(st["1"].step) == 3 and float(st["2"]["count"]) == 3
    saved = opt.state_dict()["layers"][name]
    assert set(saved) == {f"1.{f}" for f in RiteState._fields} | {"2.count"}
    again = unflatten(opt.layer_state[name], saved)
    assert isinstance(again["1"], RiteState) and flatten(again).keys() == saved.keys()
    assert all(torch.equal(v, flatten(again)[k]) and v is not flatten(again)[k] for k, v in saved.items())


def test_a_state_is_read_only_and_the_old_in_place_protocol_is_told_the_fix():
    view = ReadOnlyState({"a": {"b": torch.zeros(())}})
    with pytest.raises(TypeError, match="read-only.*Update"):
        view["a"]["b"] = torch.ones(())
    model = _model()
    opt = PreconditionedOptimizer(model, base="sgd", preconditioner="test_in_place", lr=1e-3)
    with pytest.raises(TypeError, match=r"tried to set 'count'.*lowrank.optim.Update"):
        _steps(model, opt, 1)


def test_a_stateful_plugin_resumes_bitwise_from_its_flat_state():
    a, b = _model(), _model()
    opt_a = PreconditionedOptimizer(a, base="sgd", preconditioner="test_counting", lr=1e-2)
    _steps(a, opt_a, 2)
    b.load_state_dict(a.state_dict())
    opt_b = PreconditionedOptimizer(b, base="sgd", preconditioner="test_counting", lr=1e-2)
    opt_b.load_state_dict(opt_a.state_dict())
    _steps(a, opt_a, 1)
    _steps(b, opt_b, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    bad = opt_a.state_dict()
    first = next(iter(bad["layers"]))
    bad["layers"][first] = {"other": torch.zeros(())}
    with pytest.raises(ValueError, match=r"has keys \['other'\], this optimizer's \['count'\]"):
        opt_b.load_state_dict(bad)


def test_a_state_holds_tensors_only():
    with pytest.raises(TypeError, match="'n' is a int; a state holds tensors"):
        flatten({"n": 3})
