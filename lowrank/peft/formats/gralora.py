"""PEFT's GraLoRA tuner (``peft_type = "GRALORA"``) as lowrank's ``gralora`` adapter: the packed factors
``A (r_g + h, d_in)``, ``B (d_out, r_g + h)`` split into PEFT's per-block ``gralora_A (k, d_in/k, r_g)``,
``gralora_B (k, r_g, d_out/k)`` and the hybrid part's ``gralora_{A,B}_general``."""

from __future__ import annotations

from typing import Any

import torch

from ...adapters.gralora import GraLoRALayer
from . import PeftFormat, check_peft_tensors, register_peft_format


@register_peft_format
class GraLoRAFormat(PeftFormat):
    adapter_class = GraLoRALayer
    peft_type = "GRALORA"
    peft_prefix = "gralora_"

    @classmethod
    def to_peft(cls, layers: dict[str, GraLoRALayer], config) -> tuple[dict, dict, dict[str, Any]]:
        """``({layer: {PEFT key: tensor}}, {}, PEFT config fields)``; PEFT's config has one rank, alpha, ``k`` and
        ``hybrid_r`` for all layers, so layers that differ are refused."""
        ranks = {(layer.rank, layer.scaling) for layer in layers.values()}
        if len(ranks) > 1:
            raise ValueError(f"PEFT's GraLoRA has one r, hybrid_r and alpha for every layer; these layers have (rank, "
                             f"scale) {sorted(ranks)}: inject without rank_pattern / alpha_pattern to export")
        first = next(iter(layers.values()))
        r_g, h, k = first.block_rank, first.hybrid_r, first.k
        out = {}
        for name, layer in layers.items():
            A, B = layer.A.detach(), layer.B.detach()
            t = {"gralora_A": A[:r_g].reshape(r_g, k, layer.d_in // k).permute(1, 2, 0),
                 "gralora_B": B[:, :r_g].reshape(k, layer.d_out // k, r_g).permute(0, 2, 1)}
            if h:
                t.update({"gralora_A_general.weight": A[r_g:], "gralora_B_general.weight": B[:, r_g:]})
            out[name] = t
        alpha = first.alpha if config.scaling == "standard" else first.scaling * first.rank  # PEFT: alpha / (r_g + h)
        return out, {}, {"r": r_g, "hybrid_r": h, "gralora_k": k, "alpha": alpha, "gralora_dropout": config.dropout,
                         "init_weights": True}

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]],
                  shared: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> tuple[dict, dict]:
        """``(LoRAConfig fields, {layer: this adapter's tensors})`` from a PEFT GraLoRA adapter; ``ValueError``
        naming the first tensor that does not fit."""
        r_g, h, k = (int(peft_config.get(key, default)) for key, default in (("r", 32), ("hybrid_r", 0), ("gralora_k", 2)))
        out = {}
        for name, t in layers.items():
            m, n = shapes[name]
            want = {"gralora_A": (k, n // k, r_g), "gralora_B": (k, r_g, m // k)}
            if h:
                want.update({"gralora_A_general.weight": (h, n), "gralora_B_general.weight": (m, h)})
            check_peft_tensors(name, t, want)
            A = t["gralora_A"].permute(2, 0, 1).reshape(r_g, n)
            B = t["gralora_B"].permute(0, 2, 1).reshape(m, r_g)
            if h:
                A, B = torch.cat([A, t["gralora_A_general.weight"]]), torch.cat([B, t["gralora_B_general.weight"]], 1)
            out[name] = {"A": A, "B": B}
        fields = {"rank": r_g + h, "alpha": float(peft_config.get("alpha", 64)), "adapter": "gralora", "init": "gralora",
                  "adapter_options": {"k": k, "hybrid_r": h}, "dropout": float(peft_config.get("gralora_dropout") or 0.0)}
        return fields, out
