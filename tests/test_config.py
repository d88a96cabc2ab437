"""LoRAConfig validation, per-layer patterns and scaling."""

from __future__ import annotations

import math

import pytest

from lowrank import LoRAConfig
from lowrank.config import matches_targets


def test_scaling_standard_and_rslora():
    assert LoRAConfig(targets=["q"], rank=8, alpha=16).scaling_for("q") == 2.0
    assert LoRAConfig(targets=["q"], rank=8, alpha=16, scaling="rslora").scaling_for("q") == pytest.approx(16 / math.sqrt(8))


def test_patterns_override_per_layer():
    cfg = LoRAConfig(targets=["query", "value"], rank=4, alpha=8, rank_pattern={r"layer\.1\..*query": 2},
                     alpha_pattern={"value": 4})
    assert cfg.rank_for("encoder.layer.1.attention.self.query") == 2
    assert cfg.rank_for("encoder.layer.0.attention.self.query") == 4
    assert cfg.alpha_for("encoder.layer.0.attention.self.value") == 4
    assert cfg.scaling_for("encoder.layer.1.attention.self.query") == 8 / 2


@pytest.mark.parametrize("targets,name,hit", [
    (["query"], "bert.encoder.layer.0.attention.self.query", True),
    (["self.query"], "bert.encoder.layer.0.attention.self.query", True),
    (["query"], "bert.encoder.layer.0.attention.self.query_x", False),
    (["uery"], "bert.encoder.layer.0.attention.self.query", False),
    (r".*layer\.0\..*(query|value)", "bert.encoder.layer.0.attention.self.value", True),
    (r"query|value", "bert.encoder.layer.0.attention.self.value", True),
    (r"query|value", "bert.encoder.layer.0.attention.self.key", False),
])
def test_target_matching(targets, name, hit):
    assert matches_targets(targets, name) is hit


def test_frozen_and_round_trips():
    cfg = LoRAConfig(targets=["a", "b"], rank=2, init="gaussian", init_options={"std": 0.1}, trainable="head")
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 3  # type: ignore[misc]
    assert cfg.trainable == ("head",)
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown LoRAConfig keys"):
        LoRAConfig.from_dict({**cfg.to_dict(), "rnak": 3})


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "invalid rank=0"),
    ({"rank": -2}, "invalid rank=-2"),
    ({"rank": 2.5}, "invalid rank=2.5"),
    ({"alpha": 0}, "invalid alpha=0"),
    ({"alpha": float("nan")}, "invalid alpha=nan"),
    ({"scaling": "sqrt"}, "invalid scaling='sqrt'"),
    ({"dropout": 1.0}, "invalid dropout=1.0"),
    ({"targets": []}, "invalid targets"),
    ({"targets": "("}, "not a valid regex"),
    ({"rank_pattern": {"q": 0}}, r"invalid rank_pattern\['q'\]=0"),
    ({"init_options": {"sdt": 1}}, r"unknown option\(s\) \['sdt'\] for initializer 'kaiming'"),
])
def test_bad_values_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**{"targets": ["q"], **kwargs})


def test_unknown_initializer_and_adapter():
    with pytest.raises(KeyError, match="did you mean 'gaussian'"):
        LoRAConfig(targets=["q"], init="gausian")
    with pytest.raises(KeyError, match="unknown adapter 'lroa'.*'lora'"):
        LoRAConfig(targets=["q"], adapter="lroa")
