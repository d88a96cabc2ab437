"""OLoRA: orthonormal LoRA initialization from a QR decomposition.

Büyükakyüz 2024, arXiv 2406.01775. With ``W0 = Q R`` (``W0`` as ``(d_out, d_in)``, also for
GPT-2 ``Conv1D``, whose stored transpose PEFT's version mishandles):

    B = Q[:, :r]   (orthonormal columns, B^T B = I),   A = R[:r, :],   W = W0 - s B A
"""

from __future__ import annotations

import torch

from ..registry import register_initializer
from .base import InitResult, Initializer, LayerContext


@register_initializer("olora")
class OLoRA(Initializer):
    """OLoRA (arXiv 2406.01775): B = Q_r, A = R_r from W0 = QR, offset base."""

    offset = True

    def init_layer(self, ctx: LayerContext) -> InitResult:
        Q, R = torch.linalg.qr(ctx.weight)  # (m, k), (k, n), k = min(m, n)
        return InitResult(A=R[: ctx.rank], B=Q[:, : ctx.rank], offset=True)
