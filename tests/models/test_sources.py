"""Model construction from recorded sources, and the toy models of crisp_edge.testing."""
from __future__ import annotations

import pytest
import torch

from crisp_edge import CheckpointError, ConfigError, build_model, create_model
from crisp_edge.models.sources import SOURCE_ATTR, source_of
from crisp_edge.testing import (
    TIMM_VIT_SOURCE,
    example_inputs,
    forward,
    toy_model,
    toy_timm_vit,
)


def test_toys_are_seeded_small_and_in_eval_mode(arch):
    a, b, c = toy_model(arch, seed=0), toy_model(arch, seed=0), toy_model(arch, seed=1)
    assert not a.training
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items() if v.is_floating_point())
    assert sum(p.numel() for p in a.parameters()) < 100_000
    out = forward(a, example_inputs(a, batch=3))
    assert out.shape[0] == 3 and torch.isfinite(out).all()


def test_toys_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    toy_timm_vit(seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_timm_toy_records_its_source():
    model = toy_timm_vit()
    assert getattr(model, SOURCE_ATTR) == TIMM_VIT_SOURCE == source_of(model)
    assert toy_timm_vit(depth=2).crisp_edge_source["kwargs"]["depth"] == 2


@pytest.mark.parametrize("arch", ["hf-vit", "hf-llama"])
def test_hf_source_rebuilds_the_same_architecture(arch):
    model = toy_model(arch)
    source = source_of(model)
    assert source["library"] == "transformers" and source["class"] == type(model).__name__
    rebuilt = build_model(source)
    assert type(rebuilt) is type(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert source_of(rebuilt) == source


@pytest.mark.parametrize("source, message", [
    ({"library": "keras"}, "cannot rebuild a model from source library 'keras'"),
    ({"library": "transformers", "config": {"hidden_size": 8}}, "has no 'model_type'"),
    ({"library": "transformers", "class": "os", "config": {"model_type": "vit"}}, "is not a transformers model class"),
])
def test_bad_sources(source, message):
    with pytest.raises(CheckpointError, match=message):
        build_model(source)


def test_create_model_names():
    model = create_model("timm:vit_tiny_patch16_224", random_init=True)  # no weights on this machine: on purpose
    assert type(model).__name__ == "VisionTransformer" and model.crisp_edge_source["name"] == "vit_tiny_patch16_224"
    with pytest.raises(ConfigError, match="unknown model 'nope'.*fmnist-vit.*timm:<name>"):
        create_model("nope")
