"""Preconditioner state as values (optax-style): ``init_state`` builds it, ``update`` returns the next one
(:class:`Update`) and never writes into the one it is given. A state is a tensor, a ``NamedTuple`` of states
(typed, e.g. LoRA-RITE's) or a mapping of them (a chain nests its parts' states under ``"0"``, ``"1"``, ...);
it is flattened to dotted keys only where it meets ``state_dict``, so the saved format is a flat
``{key: tensor}`` per layer."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, NamedTuple

import torch


class Update(NamedTuple):
    """What a stateful preconditioner's ``update`` returns: the directions and the layer's next state (a
    stateless one may return the plain pair ``(grad_A, grad_B)``)."""

    grad_A: torch.Tensor | None
    grad_B: torch.Tensor
    state: Any


def split(out: Any) -> tuple[torch.Tensor | None, torch.Tensor, Any]:
    """``(grad_A, grad_B, next state or None if unchanged)`` from either return form of ``update``."""
    if isinstance(out, Update):
        return out.grad_A, out.grad_B, out.state
    gA, gB = out
    return gA, gB, None


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def flatten(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{dotted key: tensor}``: mapping keys and NamedTuple fields joined with ``"."``."""
    if isinstance(state, torch.Tensor):
        return {prefix[:-1]: state}
    items = state._asdict().items() if _is_namedtuple(state) else state.items() if isinstance(state, Mapping) else None
    if items is None:
        raise TypeError(f"preconditioner state {prefix[:-1] or '<root>'!r} is a {type(state).__name__}; a state holds "
                        "tensors, NamedTuples and mappings of them only (so it round-trips through state_dict)")
    return {k: v for key, sub in items for k, v in flatten(sub, f"{prefix}{key}.").items()}


def unflatten(template: Any, flat: Mapping[str, torch.Tensor], prefix: str = "") -> Any:
    """The structure of ``template`` with its tensors taken (cloned) from ``flat``."""
    if isinstance(template, torch.Tensor):
        return flat[prefix[:-1]].clone()
    if _is_namedtuple(template):
        return type(template)(*(unflatten(v, flat, f"{prefix}{k}.") for k, v in template._asdict().items()))
    return {k: unflatten(v, flat, f"{prefix}{k}.") for k, v in template.items()}


class ReadOnlyState(Mapping):
    """The view of a mapping state a preconditioner's ``update`` gets: reading works (nested mappings are
    read-only too); writing raises, naming the contract."""

    def __init__(self, state: Mapping[str, Any]):
        self._state = state

    def __getitem__(self, key: str) -> Any:
        return read_only(self._state[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(f"preconditioner state is read-only (tried to set {key!r}): return "
                        "lowrank.optim.Update(grad_A, grad_B, state=<the next state>) from update instead, so a step "
                        "the optimizer refuses (a non-finite gradient) leaves the state as it was")

    def __delitem__(self, key: str) -> None:
        self.__setitem__(key, None)

    def __repr__(self) -> str:
        return f"ReadOnlyState({dict(self._state)!r})"


def read_only(state: Any) -> Any:
    return ReadOnlyState(state) if isinstance(state, Mapping) and not isinstance(state, ReadOnlyState) else state


def unwrapped(state: Any) -> Any:
    """The state a :class:`ReadOnlyState` view shows (anything else as it is): what a state that did not change
    carries forward, so the next state holds no views."""
    return state._state if isinstance(state, ReadOnlyState) else state
