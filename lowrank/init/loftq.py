"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al. 2023, arXiv 2310.08659, Algorithm 1).

LoftQ picks the quantized base ``Q`` and the adapter together so that ``deq(Q) + s B A`` is close to the
full-precision ``W0``, alternating ``T`` times (``B_0 A_0 = 0``):

    Q_t       = quant(W0 - s B_{t-1} A_{t-1})
    s B_t A_t = SVD_r(W0 - deq(Q_t))          B_t = U_r diag(sqrt(S_r / s)),  A_t = diag(sqrt(S_r / s)) V_r^T

and trains ``B_T``, ``A_T`` on the base ``Q_T``. ``quant`` is bitsandbytes' 4-bit quantizer (NF4 by default;
block size 64, no double quantization, as PEFT's ``loftq_init``).

How lowrank stores it. LoftQ runs on a **full-precision** layer (on a 4-bit layer ``W0`` is gone: with
``W0 = deq(Q0)`` the first residual is zero and so is the adapter; that case is refused). The base is offset by
the *previous* iterate, ``W = W0 - s B_{T-1} A_{T-1}`` (``InitResult.offset_factors``; the record ``A0``,
``B0`` rebuilds it from ``W0`` and ``lowrank.peft.export`` converts it like any offset), which quantizes to
exactly ``Q_T``: after :func:`lowrank.quantize_base` (same settings, the default) the model computes
LoftQ's ``deq(Q_T) + s B_T A_T``. Before quantization the full-precision model computes
``W0 + s (B_T A_T - B_{T-1} A_{T-1})``: LoftQ does not keep the full-precision output, it approximates ``W0``
on the quantized base (``||W0 - deq(Q_T) - s B_T A_T||_F`` is what it lowers against plain ``quant(W0)``;
``tests/test_loftq.py`` checks that for every layer).

Departures of PEFT 0.21's ``loftq_init`` (``init_lora_weights="loftq"``): it writes ``deq(Q_T)`` into the
full-precision weight (lowrank writes ``W0 - s B_{T-1} A_{T-1}``, which quantizes to the same ``Q_T`` and keeps
``W0`` recoverable), it splits ``SVD_r`` as ``B = U sqrt(S)``, ``A = sqrt(S) V^T`` without the scale (its product
is ``s`` times the residual unless ``s = 1``; lowrank divides by ``s``), and it runs on CUDA/XPU only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import is_4bit, nf4_roundtrip, require_bitsandbytes
from ..registry import register_initializer
from ..weights import offset_value
from .base import InitResult, Initializer, LayerContext
from .pissa import balanced_factors
from .svd import top_svd

QUANT_TYPES = ("nf4", "fp4")


@register_initializer("loftq")
class LoftQ(Initializer):
    """LoftQ (arXiv 2310.08659): alternate 4-bit quantization and a rank-r SVD of its residual."""

    offset = True
    preserves_output = False  # it approximates W0 on the quantized base, not the full-precision output

    @dataclass(frozen=True)
    class Options:
        num_iter: int = 1
        """``T``, the alternations (PEFT's ``loftq_iter`` default; the paper uses up to 5)."""
        quant_type: str = "nf4"
        blocksize: int = 64
        compress_statistics: bool = False
        """bitsandbytes' double quantization of the block scales."""

        def __post_init__(self):
            if isinstance(self.num_iter, bool) or not isinstance(self.num_iter, int) or self.num_iter < 1:
                raise ValueError(f"invalid num_iter={self.num_iter!r}: must be an integer >= 1")
            if self.quant_type not in QUANT_TYPES:
                raise ValueError(f"invalid quant_type={self.quant_type!r}: must be one of {QUANT_TYPES}")
            if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
                raise ValueError(f"invalid blocksize={self.blocksize!r}: bitsandbytes takes a power of two in "
                                 "[32, 4096] (64 is QLoRA's)")

    def check_layer(self, ctx: LayerContext) -> None:
        require_bitsandbytes(f"initializer 'loftq' (layer {ctx.name!r})")
        if is_4bit(ctx.module):
            raise ValueError(f"layer {ctx.name!r} is already 4-bit: its full-precision weight, which LoftQ "
                             "approximates, is not available (on deq(Q) the residual is zero). Load the model in "
                             "full precision, lowrank.inject(model, LoRAConfig(init='loftq', ...)), then "
                             "lowrank.quantize_base(model); or use pissa / lora_ga on the 4-bit base")

    def quantization(self) -> dict:
        """The base must be quantized as the alternation was (``lowrank.quantize_base`` reads this)."""
        o = self.options
        return {"quant_type": o.quant_type, "blocksize": o.blocksize, "compress_statistics": o.compress_statistics}

    def init_layer(self, ctx: LayerContext) -> InitResult:
        o, W, s = self.options, ctx.weight, ctx.scaling
        A0, B0 = ctx.zeros(ctx.rank, ctx.n), ctx.zeros(ctx.m, ctx.rank)
        for t in range(o.num_iter):
            # quantize exactly what the commit will write (W0 - s B0 A0 in the weight's dtype), so quantize_base
            # reproduces Q_t bit for bit
            base = offset_value(ctx.module, W, A0, B0, s)
            residual = W - nf4_roundtrip(base, o.blocksize, o.quant_type, o.compress_statistics).to(W)
            A, B = balanced_factors(*top_svd(residual, ctx.rank), s)
            if t + 1 < o.num_iter:
                A0, B0 = A, B
        return InitResult(A=A, B=B, offset=True, offset_factors=(A0, B0))
