"""PEFT's RandLoRA tuner (``peft_type = "RANDLORA"``) as lowrank's ``randlora`` adapter: the layers' slices of
the shared random bases gathered into PEFT's ``randlora_A (r, 1, small)``, ``randlora_B (large, n_bases, r)``, and
the trained scalings ``randlora_lambda``, ``randlora_gamma``."""

from __future__ import annotations

from typing import Any

import torch

from ...adapters.randlora import RandLoRALayer, basis_shapes
from . import PeftFormat, check_peft_tensors, register_peft_format


@register_peft_format
class RandLoRAFormat(PeftFormat):
    adapter_class = RandLoRALayer
    peft_type = "RANDLORA"
    peft_prefix = "randlora_"

    @classmethod
    def to_peft(cls, layers: dict[str, RandLoRALayer], config) -> tuple[dict, dict, dict[str, Any]]:
        """``({layer: {PEFT key: tensor}}, {"randlora_A", "randlora_B"}, PEFT config fields)``: the shared bases
        rebuilt from the layers' slices (entries no layer reads are 0); refused when ranks or scales differ across
        layers, or when the layers' bases are not slices of one pair."""
        scales = {(layer.rank, layer.scaling) for layer in layers.values()}
        if len(scales) > 1:
            raise ValueError(f"PEFT's RandLoRA has one r and randlora_alpha for every layer; these layers have (rank, "
                             f"scale) {sorted(scales)}: inject without rank_pattern / alpha_pattern to export")
        first = next(iter(layers.values()))
        r = first.rank
        n_bases, small, large = basis_shapes(r, max(lay.d_out for lay in layers.values()),
                                             max(lay.d_in for lay in layers.values()))
        A = first.basis_A.new_zeros(r, 1, small)
        B = first.basis_B.new_zeros(large, n_bases, r)
        seen_A, seen_B = (torch.zeros(t.shape, dtype=torch.bool, device=t.device) for t in (A, B))
        for name, layer in layers.items():
            n, d, D = basis_shapes(r, layer.d_out, layer.d_in)
            _place(A[:, 0, :d], seen_A[:, 0, :d], layer.basis_A, name)
            _place(B[:D, :n], seen_B[:D, :n], layer.basis_B, name)
        out = {name: {"randlora_lambda": layer.lam.detach(), "randlora_gamma": layer.gamma.detach(),
                      "randlora_A": A.clone(), "randlora_B": B.clone()} for name, layer in layers.items()}
        init_options = config.init_options  # a random-basis initializer's sparse / very_sparse (absent: dense)
        alpha = first.alpha if config.scaling == "standard" else first.scaling * r  # PEFT: randlora_alpha / r
        return out, {"randlora_A": A, "randlora_B": B}, {
            "r": r, "randlora_alpha": alpha, "randlora_dropout": config.dropout, "projection_prng_key": config.seed,
            "save_projection": True, "sparse": bool(init_options.get("sparse", False)),
            "very_sparse": bool(init_options.get("very_sparse", False)), "init_weights": True}

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]],
                  shared: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> tuple[dict, dict]:
        """``(LoRAConfig fields, {layer: tensors})`` from a PEFT RandLoRA adapter: each layer's slice of the bases
        (its own copy, else the shared pair; without either, the bases are left to the ``randlora`` initializer,
        which draws PEFT's from ``projection_prng_key``). ``ValueError`` naming the first tensor that does not fit."""
        r = int(peft_config.get("r", 32))
        out = {}
        for name, t in layers.items():
            n_bases, small, large = basis_shapes(r, *shapes[name])
            want = {"randlora_lambda": (r, n_bases), "randlora_gamma": (n_bases, small)}
            bases = [t.get(key, shared.get(key)) for key in ("randlora_A", "randlora_B")]
            if all(b is not None for b in bases):
                A, B = bases
                want.update({k: tuple(v.shape) for k, v in t.items() if k in ("randlora_A", "randlora_B")})
                if A.dim() != 3 or B.dim() != 3 or A.shape[:2] != (r, 1) or A.shape[2] < small or B.shape[2] != r \
                        or B.shape[0] < large or B.shape[1] < n_bases:
                    raise ValueError(f"layer {name!r}: randlora_A {tuple(A.shape)} / randlora_B {tuple(B.shape)} do not "
                                     f"hold this layer's bases (r={r}, needs ({r}, 1, >={small}) and (>={large}, "
                                     f">={n_bases}, {r}))")
            elif peft_config.get("save_projection", True) or any(b is not None for b in bases):
                raise ValueError(f"layer {name!r}: the adapter lacks randlora_A / randlora_B (save_projection=true); "
                                 "the file is partial")
            check_peft_tensors(name, t, want)
            own = {"lam": t["randlora_lambda"], "gamma": t["randlora_gamma"]}
            if bases[0] is not None:
                own.update(basis_A=bases[0][:, 0, :small], basis_B=bases[1][:large, :n_bases, :])
            out[name] = own
        very = bool(peft_config.get("very_sparse", False))  # PEFT: very_sparse wins over sparse
        fields = {"rank": r, "alpha": float(peft_config.get("randlora_alpha", 640)), "adapter": "randlora",
                  "init": "randlora", "init_options": {"sparse": bool(peft_config.get("sparse")) and not very,
                                                       "very_sparse": very},
                  "seed": int(peft_config.get("projection_prng_key", 0)),
                  "dropout": float(peft_config.get("randlora_dropout") or 0.0)}
        return fields, out


def _place(region: torch.Tensor, seen: torch.Tensor, value: torch.Tensor, name: str) -> None:
    """Write one layer's basis slice into the shared basis; entries another layer wrote must agree."""
    value = value.detach().to(region)
    if not torch.equal(region[seen], value[seen]):
        raise ValueError(f"layer {name!r}: its random bases are not a slice of the pair the other layers share; PEFT's "
                         "RandLoRA holds one pair for all layers, so export layers whose bases were drawn together "
                         "(one inject, one load_adapter or lowrank.peft.load)")
    region.copy_(value)
    seen.fill_(True)
