"""Intruder dimensions (arXiv 2410.21228): a float64 construction with a known answer, PEFT's detection on the same
weights, and the model-level call on the original pretrained weights (offset inits included)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import lowrank
from lowrank.theory import intruder_dimensions, model_intruder_dimensions
from tests.conftest import Snapshot, tiny_llama


def _orthonormal(m, k, g):
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def test_a_new_direction_outside_the_pretrained_span_is_an_intruder_and_a_small_update_is_not():
    g = torch.Generator().manual_seed(0)
    Q = _orthonormal(40, 21, g)
    U0, u_new = Q[:, :20], Q[:, 20]  # u_new is orthogonal to every pretrained left singular vector
    V0 = _orthonormal(20, 20, g)
    S0 = torch.cat([torch.linspace(5, 1, 19, dtype=torch.float64), torch.tensor([1e-6], dtype=torch.float64)])
    W0 = U0 @ torch.diag(S0) @ V0.T  # (40, 20), full rank
    intruded = W0 + 8.0 * torch.outer(u_new, V0[:, -1])  # the new top direction mixes with u0_19 only by 1e-6 / 8
    res = intruder_dimensions(W0, intruded)
    assert res.count == 1 and res.indices == (0,) and res.similarity[0] < 1e-5
    assert all(s > 0.99 for s in res.similarity[1:])
    small = W0 + 1e-3 * torch.randn(40, 20, generator=g, dtype=torch.float64)
    assert intruder_dimensions(W0, small).count == 0
    assert intruder_dimensions(W0, intruded, epsilon=1e-9).count == 0  # the threshold is strict
    assert len(intruder_dimensions(W0, intruded, top_k=3).similarity) == 3


def test_bad_input_is_named():
    w = torch.randn(4, 3)
    for args, match in (((w, torch.randn(3, 4)), "same shape"), ((w, w, 0), "top_k=0"), ((w, w, 10, 1.5), "epsilon"),
                        ((w[0], w), "2-D"), ((w, w * float("nan")), "non-finite")):
        with pytest.raises(ValueError, match=match):
            intruder_dimensions(*args)


def test_counts_match_peft_detection_on_the_same_weights():
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8,
                                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    ours = {}
    for i, (name, m) in enumerate((n, m) for n, m in pm.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B):
        with torch.no_grad():  # updates from tiny to large: some layers with intruders, some without
            m.lora_A["default"].weight.copy_(torch.randn(m.lora_A["default"].weight.shape, generator=g))
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 10 ** (i % 4 - 3))
            W = m.get_base_layer().weight
            ours[name] = intruder_dimensions(W, W + m.get_delta_weight("default")).count
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft.tuners.lora.intruders import reduce_intruder_dimension

        reduce_intruder_dimension(pm, logging_sink=lines.append)
    theirs = {}
    for line in lines:
        hit = re.fullmatch(r"(.+): (?:No intruders|Intruders: (\d+))", line)
        if hit:
            theirs[hit[1]] = int(hit[2] or 0)
    assert theirs == ours and len(ours) == 6
    assert 0 < sum(v > 0 for v in ours.values()) < len(ours)  # both outcomes are exercised


def test_the_model_level_call_compares_with_the_original_weights():
    model = tiny_llama()
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    cfg = lowrank.LoRAConfig(rank=4, targets=["q_proj", "v_proj"], init="pissa")  # offsets the base
    model = lowrank.inject(model, cfg, progress=False)
    with torch.no_grad():
        for _, layer in lowrank.adapted_layers(model):
            layer.B.mul_(5.0)
    res = model_intruder_dimensions(model, top_k=6)
    assert res.keys() == W0.keys()
    for name, layer in lowrank.adapted_layers(model):
        tuned = layer.base_weight().double() + layer.delta_weight(torch.float64)
        want = intruder_dimensions(W0[name], tuned, top_k=6)
        assert res[name].indices == want.indices
        assert max(abs(a - b) for a, b in zip(res[name].similarity, want.similarity)) < 1e-5
    lowrank.merge(model)
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="is merged; call lowrank.unmerge"):
        model_intruder_dimensions(model)
    snap.assert_unchanged()
