"""The architecture table: detection, subclasses, registering a new architecture, and clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from crisp_edge import (
    ARCHITECTURES,
    ArchSpec,
    CrispConfig,
    RoleConfig,
    UnknownArchitectureError,
    crisp_bases,
    detect_architecture,
    register_architecture,
    retrofit_,
)
from crisp_edge.method.specs import get_architecture, resolve_blocks
from tests.conftest import fresh_toy


def test_builtin_architectures():
    assert {"timm-vit", "hf-vit", "hf-llama"} <= set(ARCHITECTURES)
    assert list(get_architecture("timm-vit").roles) == ["qkv", "proj", "fc1", "fc2"]


def test_detect_each_toy(arch):
    model = fresh_toy(arch)
    spec = detect_architecture(model)
    assert spec.name == arch
    blocks = resolve_blocks(model, spec)
    for block in blocks:  # every role path resolves to an nn.Linear in every block
        for path in spec.roles.values():
            assert isinstance(block.get_submodule(path), nn.Linear)
    assert isinstance(model.get_submodule(spec.head), nn.Linear)


def test_subclasses_are_detected():
    class MyViT(VisionTransformer):
        pass

    model = MyViT(img_size=16, patch_size=8, in_chans=1, num_classes=2, embed_dim=32, depth=1, num_heads=2)
    assert detect_architecture(model).name == "timm-vit"


def test_unknown_model():
    with pytest.raises(UnknownArchitectureError, match="no architecture spec for Sequential. Supported: timm-vit"):
        detect_architecture(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UnknownArchitectureError, match=r"unknown architecture 'bert'; registered: \[.*'hf-llama'"):
        get_architecture("bert")


def test_empty_blocks():
    class Empty(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList()

    with pytest.raises(UnknownArchitectureError, match="not a non-empty ModuleList"):
        resolve_blocks(Empty(), get_architecture("timm-vit"))


class TinyMLPStack(nn.Module):
    """A model crisp-edge knows nothing about until its spec is registered."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})
                                    for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["down"](torch.relu(layer["up"](x)))
        return x


def test_register_a_new_architecture(monkeypatch):
    monkeypatch.setattr("crisp_edge.method.specs.ARCHITECTURES", dict(ARCHITECTURES))  # keep the registry clean
    from crisp_edge.method import specs

    torch.manual_seed(0)
    model = TinyMLPStack().eval()
    with pytest.raises(UnknownArchitectureError):
        detect_architecture(model)
    spec = register_architecture(ArchSpec(name="mlp-stack", class_names=("TinyMLPStack",), blocks="layers",
                                          roles={"up": "up", "down": "down"}))
    assert specs.ARCHITECTURES["mlp-stack"] is spec
    x = torch.randn(4, 8)
    expected = model(x)
    report = retrofit_(model, CrispConfig(default=RoleConfig(s=8, group_size=None)), progress=False)
    assert model.crisp_arch == "mlp-stack"
    assert sorted(crisp_bases(model)) == ["down_0_2", "up_0_2"]
    assert report.max_error <= 1e-5
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
