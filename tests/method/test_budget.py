"""Parameter budgets: stored u*r + n*r*s per group, trainable n*r*s, and the compression they imply."""
from __future__ import annotations

import json

import pytest

from crisp_edge import CrispConfig, RoleConfig, budget, convert_
from crisp_edge.testing import toy_timm_vit

# timm toy: embed 32, 4 blocks, mlp 128. (d_out, d_in) per role:
SHAPES = {"qkv": (96, 32), "proj": (32, 32), "fc1": (128, 32), "fc2": (32, 128)}


@pytest.mark.parametrize("s, r, group_size", [(4, None, 2), (4, 3, 2), (8, 5, None), (16, 40, 1)])
def test_budget_of_a_known_toy(s, r, group_size):
    model = convert_(toy_timm_vit(), CrispConfig(default=RoleConfig(s=s, r=r, group_size=group_size)))
    b = budget(model)
    n = group_size or 4
    rank = r if r is not None else n * s
    n_groups = 4 // n
    stored = trainable = original = 0
    for d_out, d_in in SHAPES.values():
        u = d_in * d_out // s
        stored += n_groups * (u * rank + n * rank * s)
        trainable += n_groups * n * rank * s
        original += 4 * d_in * d_out
    assert (b.original, b.stored, b.trainable_per_task) == (original, stored, trainable)
    assert len(b.groups) == 4 * n_groups
    assert b.compression == pytest.approx(original / stored)
    assert b.kept_fraction == pytest.approx(stored / original)
    assert b.max_trainable_per_layer == rank * s
    # what the model actually holds agrees with the budget
    params = dict(model.named_parameters())
    assert sum(p.numel() for k, p in params.items() if "crisp_" in k) == stored
    assert sum(p.numel() for k, p in params.items() if k.endswith("crisp_mixer")) == trainable


def test_compression_is_sensible():
    full = budget(convert_(toy_timm_vit(), CrispConfig(default=RoleConfig(s=4, group_size=4))))
    # full capacity stores the weights plus the mixers: slightly more than dense, never less
    assert 0.9 < full.compression < 1.0
    half = budget(convert_(toy_timm_vit(), CrispConfig(default=RoleConfig(s=4, group_size=4, r=8))))
    assert (half.original, half.stored) == (49152, 8 * (768 + 256 + 1024 + 1024) + 4 * (4 * 8 * 4))
    assert 1.9 < half.compression < 2.0  # r = n*s/2: about half the storage
    assert half.trainable_per_task == 4 * 4 * 8 * 4 < 0.011 * half.original  # ~1%


def test_group_budget_fields_and_json():
    b = budget(convert_(toy_timm_vit(), CrispConfig(default=RoleConfig(s=4, group_size=2, r=6), targets=("fc1",))))
    g = {x.key: x for x in b.groups}["fc1_2_3"]
    assert (g.role, g.n_layers, g.d_out, g.d_in, g.u, g.r, g.s, g.full_rank) == ("fc1", 2, 128, 32, 1024, 6, 4, 8)
    assert (g.original, g.stored, g.trainable) == (2 * 4096, 1024 * 6 + 2 * 6 * 4, 2 * 6 * 4)
    d = json.loads(json.dumps(b.to_dict()))
    assert d["stored"] == b.stored and d["compression"] == pytest.approx(b.compression) and len(d["groups"]) == 2


def test_plain_model_has_an_empty_budget():
    b = budget(toy_timm_vit())
    assert (b.original, b.stored, b.trainable_per_task, b.groups) == (0, 0, 0, ())
    assert b.max_trainable_per_layer == 0
