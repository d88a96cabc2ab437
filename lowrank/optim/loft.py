"""LoFT: AdamW whose moments live in the adapter's subspace and are carried across updates (Tastan et al.,
"LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning", arXiv 2505.21289, ICLR 2026).

With ``W = W0 + s B A`` and ``G = dL/dW``, each factor is stepped so that the change of ``W`` is the AdamW step
of full fine-tuning restricted to the subspace the other factor spans. For the ``A`` side (``P_B = B B^+``, the
``B`` side swaps the roles, working on ``W^T`` with ``P_A = A^+ A``):

1. gradient scaling: ``g_A = (B^T B)^+ grad_A / s`` (``(r, n)``), so that ``B g_A = P_B G``;
2. state calibration: the moments are kept in the coordinates of the last step's ``B``; when it becomes ``B'``
   they are carried over by ``R = (B'^T B')^+ B'^T B`` (``r x r``): first moment ``m_A <- R m_A``, per column
   ``j`` of ``W`` the ``r x r`` second moment ``v_A[j] <- R v_A[j] R^T``, the least-squares maps for which
   ``B' m_A' = P_B' (B m_A)`` and ``B' v_A'[j] B'^T = P_B' (B v_A[j] B^T) P_B'``;
3. ``m_A <- b1 m_A + (1 - b1) g_A``, ``v_A[j] <- b2 v_A[j] + (1 - b2) g_A[:, j] g_A[:, j]^T`` (updated on every
   step, for both factors, whichever factor the step moves);
4. projected full update: in full size, ``M = B m_A / (1 - b1^t)``, ``V_ij = b_i^T v_A[j] b_i / (1 - b2^t)``
   (``b_i`` row ``i`` of ``B``: the exact elementwise second moment of the full projected gradients while ``B`` is
   fixed), ``D = M / (sqrt(V) + eps)``, and the factor's direction is ``(B^T B)^+ B^T D / s``;
5. alternating updates: step ``t`` moves only ``B`` (``t`` odd, first, as ``B = 0`` at a vanilla init) or only
   ``A`` (``t`` even), so ``dW = s dB A`` or ``s B dA`` exactly, with no ``s dB dA`` term; the idle factor's
   direction is 0;
6. gradient clipping (``clip > 0``): the full projected gradients of the factors a step moves, ``P_B G`` /
   ``G P_A``, are clipped jointly over all layers to global norm ``clip`` (``coef = clip / (norm + 1e-6)``), and
   both factors' ``g`` are scaled by it before step 3.

With ``base="sgd"`` (no momentum) the optimizer steps ``A <- A - lr (direction + weight_decay A)``: this is the
method. The full-weight change ``s dB A = -lr D P_A`` does not depend on ``s``, so ``alpha`` needs no tuning; at
full rank (square ``W``, ``r = m = n``, invertible factors) ``P_A = P_B = I`` and the sequence of ``W`` is
AdamW's on ``W`` (``weight_decay = 0``), which ``tests/test_loft.py`` checks. State per layer: ``m_A (r, n)``,
``m_B (m, r)``, ``v_A (n, r, r)``, ``v_B (m, r, r)`` (more than full AdamW's ``2 m n`` once
``r^2 > 2 m n / (m + n)``) and the last ``A``, ``B``; it round-trips through ``state_dict``.

Follows the authors' code (github.com/tnurbek/loft, ``LoFTAdamW``), whose defaults these are (``b1 = 0.9``,
``b2 = 0.999``, ``eps = 1e-4``; the paper's full text was not at hand, only its abstract and summaries of its
building blocks). Where the code departs from the derivation above:

- its second-moment calibration applies the basis change transposed (``R^T v_A[j] R`` and, for ``B``,
  ``R_B v_B[i] R_B^T``); exact only when ``R`` is symmetric. ``reference_transport=True`` reproduces it;
  with it the full-rank equivalence with AdamW fails once ``b2 > 0``;
- it ignores ``s`` (its notebook asks for ``alpha = r``): for ``s != 1`` its ``dW`` is ``s`` times larger and its
  ``eps`` acts as ``eps / s``. Here ``s`` is divided out; at ``s = 1`` the two agree;
- it steps the parameters in order, so the factor processed second scales its gradient and carries its moments
  with the other factor already moved in the same step; here both sides use the factors the gradient was taken
  at. (At full rank, ``b1 = 0.9``, ``b2 = 0.999``, 20 steps, the code's ``W`` leaves AdamW's by 0.69 relative;
  0.30 with the transport fixed; 1.7e-4, its damping, with both fixed);
- it decays the moved factor by ``(1 - weight_decay)``, without ``lr``; here the base optimizer's
  ``weight_decay`` applies, to both factors on every step (``lr * weight_decay``);
- its clipping norm also counts the non-adapter parameters (a head); a preconditioner sees only the adapters;
- its Gram inverses are ``(B^T B + 1e-6 I)^-1``, ``(A A^T + 1e-8 I)^-1``; here damped pseudo-inverses
  (``delta``, default 0: at ``B = 0`` the ``A`` side's gradient and direction are 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..registry import register_preconditioner
from ._delta import DeltaOptions
from .base import BatchedPreconditioner
from .linalg import grouped, psd_pinv
from .state import Update


class LoftState(NamedTuple):
    """One layer's LoFT state; the A side's moments are in the coordinates of ``basis_A`` (the last ``B``), the
    B side's in those of ``basis_B`` (the last ``A``)."""

    step: torch.Tensor
    """Steps taken (a 0-dim tensor); its parity says which factor the next step moves."""
    m_A: torch.Tensor
    """``(r, n)`` first moment of the A side: the full-weight first moment is ``basis_A @ m_A``."""
    m_B: torch.Tensor
    """``(m, r)``: the full-weight first moment is ``m_B @ basis_B``."""
    v_A: torch.Tensor
    """``(n, r, r)``, one ``r x r`` second moment per column ``j`` of ``W``: ``V_ij = b_i^T v_A[j] b_i``."""
    v_B: torch.Tensor
    """``(m, r, r)``, one per row ``i``: ``V_ij = a_j^T v_B[i] a_j`` (``a_j`` column ``j`` of ``A``)."""
    basis_A: torch.Tensor
    """``B`` at the last step, ``(m, r)``."""
    basis_B: torch.Tensor
    """``A`` at the last step, ``(r, n)``."""


class _Side(NamedTuple):
    """One factor's step in the A side's layout (the B side is its transpose): the factor ``(r, k)`` is moved
    within the span of ``other (d, r)``; ``grad`` is its scaled gradient, ``m``, ``v`` its carried moments."""

    other: torch.Tensor
    inv_gram: torch.Tensor
    grad: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    scaling: float


@register_preconditioner("loft")
class LoFT(BatchedPreconditioner):
    """LoFT (arXiv 2505.21289): AdamW of the full weight within the factors' subspaces, moments carried across
    basis changes, alternating factor updates."""

    @dataclass(frozen=True)
    class Options(DeltaOptions):
        b1: float = 0.9
        """First-moment decay (0: none)."""
        b2: float = 0.999
        """Second-moment decay."""
        eps: float = 1e-4
        """Added to the square root of the full-size second moment (the reference code's default)."""
        clip: float = 0.0
        """Joint norm clip of the full projected gradients over all layers (0: off)."""
        alternate: bool = True
        """Move one factor per step (``B`` first); ``False``: both, as the reference's ``alternate_update=False``."""
        reference_transport: bool = False
        """Carry the second moments as the reference code does (the basis change transposed; see the docstring)."""

        def __post_init__(self):
            super().__post_init__()
            for name in ("b1", "b2"):
                v = getattr(self, name)
                if not 0 <= v < 1:
                    raise ValueError(f"invalid loft option {name}={v!r}: must be in [0, 1)")
            if not self.eps > 0:
                raise ValueError(f"invalid loft option eps={self.eps!r}: must be > 0 (it bounds the step where the "
                                 "projected second moment vanishes, e.g. at B = 0)")
            if self.clip < 0:
                raise ValueError(f"invalid loft option clip={self.clip!r}: must be >= 0 (0 turns clipping off)")

    def init_state(self, A: torch.Tensor, B: torch.Tensor) -> LoftState:
        (r, n), m = A.shape, B.shape[0]
        dt = torch.promote_types(A.dtype, torch.float32)
        z = lambda *shape: torch.zeros(*shape, dtype=dt, device=A.device)  # noqa: E731
        return LoftState(step=z(()), m_A=z(r, n), m_B=z(m, r), v_A=z(n, r, r), v_B=z(m, r, r),
                         basis_A=B.to(dt).clone(), basis_B=A.to(dt).clone())

    def note_base(self, base: type) -> None:
        """LoFT is Adam itself: under an adaptive base its directions would be normalized twice."""
        if not issubclass(base, torch.optim.SGD):
            warnings.warn(f"loft with {base.__name__}: LoFT's directions are already AdamW steps of the full weight; "
                          f"{base.__name__} normalizes them again. The paper's method is base='sgd' (no momentum)",
                          stacklevel=4)

    def _moves(self, step: torch.Tensor) -> tuple[bool, bool]:
        """``(moves A, moves B)`` at the step after ``step`` steps taken."""
        if not self.options.alternate:
            return True, True
        t = int(step.item()) + 1
        return t % 2 == 0, t % 2 == 1

    def update_many(self, layers):
        if any(layer.grad_A is None for layer in layers):
            raise ValueError("loft needs grad_A (it alternates between A and B); it cannot be chained with a "
                             "preconditioner that freezes A")
        delta = self.options.delta
        inv_BtB = grouped(psd_pinv, [layer.B.T @ layer.B for layer in layers], delta=delta)  # (r, r)
        inv_AAt = grouped(psd_pinv, [layer.A @ layer.A.T for layer in layers], delta=delta)
        sides = []
        for layer, iB, iA in zip(layers, inv_BtB, inv_AAt):
            st = layer.state
            sides.append((self._side(layer.B, st.basis_A, iB, layer.grad_A, st.m_A, st.v_A, layer.scaling),
                          self._side(layer.A.T, st.basis_B.T, iA, layer.grad_B.T, st.m_B.T, st.v_B, layer.scaling)))
        coef = self._clip_coef([(self._moves(layer.state.step), pair) for layer, pair in zip(layers, sides)])
        out = []
        for layer, (side_A, side_B) in zip(layers, sides):
            st = layer.state
            t = int(st.step.item()) + 1
            moves_A, moves_B = self._moves(st.step)
            dA, m_A, v_A = self._advance(side_A, coef, t, moves_A)
            dB, m_B, v_B = self._advance(side_B, coef, t, moves_B)
            nxt = LoftState(step=st.step + 1, m_A=m_A, m_B=m_B.T.contiguous(), v_A=v_A, v_B=v_B,
                            basis_A=layer.B.clone(), basis_B=layer.A.clone())
            out.append(Update(dA, dB.T.contiguous(), nxt))
        return out

    def _side(self, other, old, inv_gram, grad, m, v, scaling) -> _Side:
        """Scale the gradient and carry the moments from the basis ``old`` to ``other`` (``R = other^+ old``)."""
        R = inv_gram @ (other.T @ old)
        Rv = R.T if self.options.reference_transport else R
        return _Side(other, inv_gram, inv_gram @ grad / scaling, R @ m, Rv @ v @ Rv.T, scaling)

    def _clip_coef(self, items) -> float:
        """The joint clip factor over the full projected gradients of the factors this step moves."""
        clip = self.options.clip
        if not clip:
            return 1.0
        sq = 0.0
        for moves, pair in items:
            for moving, side in zip(moves, pair):
                if moving:  # ||other @ g||_F^2 = <other^T other, g g^T>
                    sq += float(((side.other.T @ side.other) * (side.grad @ side.grad.T)).sum())
        return min(1.0, clip / (math.sqrt(sq) + 1e-6))

    def _advance(self, side: _Side, coef: float, t: int,
                 moving: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(direction (r, k), next m, next v)``; the direction is 0 for a factor this step does not move."""
        o = self.options
        g = side.grad * coef if coef != 1.0 else side.grad
        m = o.b1 * side.m + (1 - o.b1) * g
        v = o.b2 * side.v + (1 - o.b2) * (g.T.unsqueeze(-1) * g.T.unsqueeze(-2))  # (k, r, r): g_j g_j^T
        if not moving:
            return torch.zeros_like(g), m, v
        d, r = side.other.shape
        outer = (side.other.unsqueeze(-1) * side.other.unsqueeze(-2)).reshape(d, r * r)  # row i: b_i b_i^T
        full_v = (outer @ v.reshape(v.shape[0], r * r).T).clamp_min(0)  # (d, k): b_i^T v[j] b_i
        denom = full_v.sqrt() / math.sqrt(1 - o.b2 ** t) + o.eps
        full = (side.other @ m) / (1 - o.b1 ** t) / denom  # (d, k): the AdamW direction of the full weight
        return side.inv_gram @ (side.other.T @ full) / side.scaling, m, v
