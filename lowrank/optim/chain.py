"""``chain``: compose preconditioners, applied in order (like ``optax.chain``)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BatchedPreconditioner, LayerGrads, Preconditioner
from .state import Update, split, unwrapped


class Chain(BatchedPreconditioner):
    """Apply each preconditioner in turn; learning-rate multipliers multiply; ``A`` is frozen if any freezes it."""

    @dataclass(frozen=True)
    class Options:
        """No options of its own."""

    registry_name = "chain"

    def __init__(self, preconditioners: list[Preconditioner]):
        super().__init__()
        if not preconditioners:
            raise ValueError("chain needs at least one preconditioner")
        bad = [p for p in preconditioners if not isinstance(p, Preconditioner)]
        if bad:
            raise TypeError(f"chain takes Preconditioner instances, got {type(bad[0]).__name__}")
        self.parts = list(preconditioners)
        self.trains_A = all(p.trains_A for p in self.parts)
        self.adapter_kinds = tuple(k for k in self.parts[0].adapter_kinds if all(k in p.adapter_kinds for p in self.parts))
        self.transforms_gradients = any(p.transforms_gradients for p in self.parts)

    def lr_multipliers(self) -> tuple[float, float]:
        a = b = 1.0
        for p in self.parts:
            pa, pb = p.lr_multipliers()
            a, b = a * pa, b * pb
        return a, b

    def init_state(self, A, B):
        """Each part's own state under its position: ``{"0": ..., "1": ...}`` (saved as ``"0.<key>"``)."""
        return {str(i): p.init_state(A, B) for i, p in enumerate(self.parts)}

    def note_base(self, base):
        for p in self.parts:
            p.note_base(base)

    def update_many(self, layers):
        out = [(layer.grad_A, layer.grad_B) for layer in layers]
        states = [{} for _ in layers]
        for i, p in enumerate(self.parts):
            key = str(i)
            items = [LayerGrads(gA if p.trains_A and self.trains_A else None, gB, layer.A, layer.B, layer.scaling,
                                layer.state[key]) for (gA, gB), layer in zip(out, layers)]
            out = []
            for layer, st, res in zip(layers, states, p.update_many(items)):
                gA, gB, nxt = split(res)
                st[key] = unwrapped(layer.state)[key] if nxt is None else nxt
                out.append((gA, gB))
        return [Update(gA, gB, st) for (gA, gB), st in zip(out, states)]

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.parts))})"


def chain(*preconditioners: Preconditioner) -> Chain:
    """Compose preconditioners: ``chain(get_preconditioner("riemannian")(), LoRAPlus(ratio=4))``."""
    return Chain(list(preconditioners))
