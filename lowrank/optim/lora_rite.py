"""LoRA-RITE: transformation-invariant adaptive preconditioning of LoRA (Yen et al. 2024,
"LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA Optimization", arXiv 2410.20625).

Per layer and step ``t``, for the ``A`` side (the ``B`` side swaps the roles of the factors):

1. orthonormal basis of the other factor, ``B = Q_B R_B`` (QR), and the *unmagnified* gradient
   ``g^_A = grad_A^T R_B^-1 = s G^T Q_B``  (``(n, r)``): it depends on ``B`` only through its column space;
2. (reference code) a factor whose ``rms(g^) > skip`` is zeroed; the unmagnified gradients of all
   layers are clipped jointly to global norm ``clip``;
3. the basis change since the last step, ``P = Q_B,t^T Q_B,t-1`` (``(r, r)``), transports the state:
   second moment ``V~ = P V P^T``, first moment ``M P^T``;
4. ``V = b2^ V~ + (1 - b2^) g^^T g^ / n`` (an ``r x r`` matrix, not per-coordinate statistics), with the
   bias correction folded into the decay, ``b^(t) = b (1 - b^(t-1)) / (1 - b^t)`` (0 at ``t = 1``);
   with ``escape=True`` the mass lost to the transport is tracked, ``rho = b2^ (rho + e)``,
   ``e = min(max_i [lambda_i(V_old) - lambda_i(V~)]_+, [tr V_old - tr V~]_+)``;
5. ``S = g^ (V + rho I)^-1/2`` (eigendecomposition; ``eps`` added to the square roots), ``M = b1^ M P^T + (1 - b1^) S``;
6. the factor's direction ``R_B^-1 M^T`` (``(r, n)``); the optimizer steps ``A <- A - lr (direction + wd A)``.

With ``base="sgd"`` (no momentum) the optimizer applies exactly this update; its moments live in
this preconditioner's state (``r x r`` matrices and two ``(n, r)`` / ``(m, r)`` first moments per
layer) and round-trip through ``state_dict``. Other bases compose as usual (they see the direction
as a gradient). Every quantity above transforms equivariantly under ``(A, B) -> (R A, B R^-1)``, so
the sequence of ``s B A`` does not depend on the factorization (``tests/test_lora_rite.py``).

Follows the authors' PyTorch reimplementation (github.com/gkevinyen5418/LoRA-RITE): QR rather than
the paper's polar decomposition (equivalent for the invariance), the exponential moving averages
with folded bias correction, the per-row normalization ``/ n``, ``eps`` outside the square root, and
the defaults ``b1 = 0.9``, ``b2 = 0.999``, ``eps = 1e-6``, ``clip = 1``, ``skip = 1``, ``escape`` off.
Unlike it, the algebra runs in float32 (float64 for float64 factors) whatever the factors' dtype,
and ``R^-1`` is a pseudo-inverse (at ``B = 0`` the ``A`` direction is 0, as in the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..registry import register_preconditioner
from .base import BatchedPreconditioner
from .state import Update


class RiteState(NamedTuple):
    """One layer's LoRA-RITE state. The A side works in the basis of B's columns, the B side in that of A's rows."""

    step: torch.Tensor
    """Steps taken (a 0-dim tensor)."""
    v_A: torch.Tensor
    """``(r, r)`` second moment of the A side."""
    v_B: torch.Tensor
    m_A: torch.Tensor
    """``(n, r)`` first moment of the A side."""
    m_B: torch.Tensor
    """``(m, r)``."""
    basis_A: torch.Tensor
    """``Q_B`` of the last step, ``(m, r)``: what the A side's moments are expressed in."""
    basis_B: torch.Tensor
    """``Q_A`` of the last step, ``(n, r)``."""
    rho_A: torch.Tensor
    """Escaped second-moment mass (0-dim; stays 0 unless ``escape``)."""
    rho_B: torch.Tensor


def _sym(X: torch.Tensor) -> torch.Tensor:
    return (X + X.T) / 2


def _decay(beta: float, t: int) -> float:
    """``beta (1 - beta^(t-1)) / (1 - beta^t)``: an EMA whose average is bias-corrected (0 at ``t = 1``)."""
    return beta * (1 - beta ** (t - 1)) / (1 - beta ** t)


@register_preconditioner("lora_rite")
class LoRARITE(BatchedPreconditioner):
    """LoRA-RITE (arXiv 2410.20625): invariant r x r second moments transported between factor bases."""

    @dataclass(frozen=True)
    class Options:
        b1: float = 0.9
        """First-moment decay (0: none)."""
        b2: float = 0.999
        """Second-moment decay."""
        eps: float = 1e-6
        """Added to the square roots of the second moment's eigenvalues."""
        clip: float = 1.0
        """Global norm clip of the unmagnified gradients over all layers (0: off)."""
        skip: float = 1.0
        """A factor whose unmagnified gradient has rms above this is zeroed for the step (0: off)."""
        escape: bool = False
        """Track the second-moment mass lost to the basis transport (the paper's escaped mass)."""

        def __post_init__(self):
            for name in ("b1", "b2"):
                v = getattr(self, name)
                if not 0 <= v < 1:
                    raise ValueError(f"invalid {name}={v!r}: must be in [0, 1)")
            for name in ("eps", "clip", "skip"):
                if getattr(self, name) < 0:
                    raise ValueError(f"invalid {name}={getattr(self, name)!r}: must be >= 0")

    def init_state(self, A: torch.Tensor, B: torch.Tensor) -> RiteState:
        (r, n), m = A.shape, B.shape[0]
        dt = torch.promote_types(A.dtype, torch.float32)
        z = lambda *shape: torch.zeros(*shape, dtype=dt, device=A.device)  # noqa: E731
        return RiteState(step=z(()), v_A=z(r, r), v_B=z(r, r), m_A=z(n, r), m_B=z(m, r), basis_A=z(m, r),
                         basis_B=z(n, r), rho_A=z(()), rho_B=z(()))

    def update_many(self, layers):
        o = self.options
        prep = []
        for layer in layers:
            QB, RB = torch.linalg.qr(layer.B)  # (m, r), (r, r)
            QA, RA = torch.linalg.qr(layer.A.T)  # (n, r), (r, r)
            iRB, iRA = torch.linalg.pinv(RB), torch.linalg.pinv(RA)
            gA = None if layer.grad_A is None else torch.nan_to_num(layer.grad_A.T @ iRB, posinf=math.nan,
                                                                      neginf=math.nan)  # (n, r) = s G^T Q_B
            gB = torch.nan_to_num(layer.grad_B @ iRA, posinf=math.nan, neginf=math.nan)  # (m, r) = s G Q_A
            if o.skip:
                gA = None if gA is None else (torch.zeros_like(gA) if gA.square().mean().sqrt() > o.skip else gA)
                gB = torch.zeros_like(gB) if gB.square().mean().sqrt() > o.skip else gB
            prep.append((QA, QB, iRA, iRB, gA, gB))
        if o.clip:
            total = math.sqrt(sum(float(g.square().sum()) for *_, gA, gB in prep for g in (gA, gB) if g is not None))
            if total > o.clip:
                prep = [(QA, QB, iRA, iRB, None if gA is None else gA * (o.clip / total), gB * (o.clip / total))
                        for QA, QB, iRA, iRB, gA, gB in prep]
        out = []
        for layer, (QA, QB, iRA, iRB, gA, gB) in zip(layers, prep):
            st = layer.state._replace(step=layer.state.step + 1)
            t = int(st.step.item())
            # the A side lives in the basis of B's column space; the B side in the basis of A's row space
            uA = None
            if gA is not None:
                uA, new = self._side(st, "A", gA, QB, t)  # (n, r)
                st = st._replace(**new)
            uB, new = self._side(st, "B", gB, QA, t)  # (m, r)
            out.append(Update(None if uA is None else iRB @ uA.T, uB @ iRA.T, st._replace(**new)))
        return out

    def _side(self, st: RiteState, side: str, g: torch.Tensor, Q: torch.Tensor,
              t: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The side's first moment (its direction before ``R^-1``) and its next state entries."""
        o = self.options
        b1, b2 = _decay(o.b1, t), _decay(o.b2, t)
        old = st._asdict()
        P = Q.T @ old[f"basis_{side}"]  # (r, r); 0 at t = 1
        V_old = old[f"v_{side}"]
        V_tilde = _sym(P @ V_old @ P.T)
        rho = old[f"rho_{side}"]
        if o.escape:
            drop = (torch.linalg.eigvalsh(V_old) - torch.linalg.eigvalsh(V_tilde)).clamp_min(0).max()
            escaped = torch.minimum(drop, (V_old.trace() - V_tilde.trace()).clamp_min(0))
            rho = b2 * (rho + escaped)
        V = _sym(b2 * V_tilde + (1 - b2) * _sym(g.T @ g) / g.shape[0])
        lam, W = torch.linalg.eigh(V)
        inv_root = _sym((W / ((lam + rho).clamp_min(0).sqrt() + o.eps)) @ W.T)
        S = torch.nan_to_num(g @ inv_root)
        M = b1 * (old[f"m_{side}"] @ P.T) + (1 - b1) * S
        return M, {f"v_{side}": V, f"m_{side}": M, f"basis_{side}": Q, f"rho_{side}": rho}
