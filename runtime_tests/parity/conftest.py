"""Shared set-up of the parity tests: a toy timm ViT retrofitted and saved as a checkpoint (a bundle's
"exported from" source), and the model loaded back from it."""
from __future__ import annotations

import pytest

import crisp_edge as ce
from crisp_edge.files.checkpoint import load_checkpoint
from crisp_edge.testing import toy_model

CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    m = toy_model("timm-vit", seed=0, depth=2)
    ce.retrofit_(m, CONFIG, progress=False)
    ce.save_checkpoint(m, d / "ckpt")
    return d / "ckpt"


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt)
