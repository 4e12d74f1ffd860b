"""Structural conversion: grouping, the shared basis, gradients, materialize_, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from crisp_edge import (
    ConfigError,
    CrispBasis,
    CrispConfig,
    RoleConfig,
    UnknownArchitectureError,
    convert_,
    crisp_bases,
    crisp_layers,
    is_crisp,
    materialize_,
    plan_groups,
    retrofit_,
)
from crisp_edge.testing import example_inputs, forward, toy_timm_vit
from tests.conftest import fresh_toy

CONFIG = CrispConfig(default=RoleConfig(s=4, group_size=2))
ROLES = {"timm-vit": 4, "hf-vit": 6, "hf-llama": 7, "hf-bert": 6, "hf-llama-cls": 7}
DEPTH = {"timm-vit": 4, "hf-vit": 2, "hf-llama": 2, "hf-bert": 2, "hf-llama-cls": 2}


def test_plan_groups_changes_nothing_and_splits_blocks():
    model = toy_timm_vit()
    before = copy.deepcopy(model.state_dict())
    spec, plans = plan_groups(model, CrispConfig(default=RoleConfig(s=4, group_size=3)))
    assert spec.name == "timm-vit"
    assert [p.key for p in plans] == ["qkv_0_2", "qkv_3_3", "proj_0_2", "proj_3_3", "fc1_0_2", "fc1_3_3",
                                      "fc2_0_2", "fc2_3_3"]
    qkv = plans[0]
    assert qkv.layer_names == ("blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.2.attn.qkv")
    assert (qkv.d_out, qkv.d_in, qkv.s, qkv.u, qkv.r, qkv.full_rank) == (96, 32, 4, 768, 12, 12)
    assert plans[1].r == 4  # a group of one layer: full rank s
    assert not is_crisp(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_plan_with_targets_overrides_and_one_group():
    config = CrispConfig(default=RoleConfig(s=4, group_size=None), roles={"fc1": RoleConfig(s=8, r=5, gate="gelu")},
                         targets=("fc1", "proj"))
    _, plans = plan_groups(toy_timm_vit(), config)
    assert [(p.key, p.s, p.r, p.gate) for p in plans] == [("fc1_0_3", 8, 5, "gelu"), ("proj_0_3", 4, 16, "silu")]


def test_full_rank_is_capped_by_u():
    # u = 32*32/256 = 4 < n*s = 4*256: the rank cannot exceed u
    _, plans = plan_groups(toy_timm_vit(), CrispConfig(default=RoleConfig(s=256, group_size=None), targets=("proj",)))
    assert (plans[0].u, plans[0].r, plans[0].full_rank) == (4, 4, 4)


def test_convert_replaces_targets_only(arch):
    model = fresh_toy(arch)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    convert_(model, CONFIG)
    layers = crisp_layers(model)
    assert len(layers) == ROLES[arch] * DEPTH[arch]
    assert set(layers) <= set(linears)
    for name in set(linears) - set(layers):  # heads and anything untargeted stay plain
        assert type(model.get_submodule(name)) is nn.Linear
    for name, layer in layers.items():
        old = linears[name]
        assert (layer.in_features, layer.out_features) == (old.in_features, old.out_features)
        assert layer.weight.shape == old.weight.shape
        if old.bias is None:
            assert layer.bias is None
        else:
            assert torch.equal(layer.bias, old.bias)
    assert model.crisp_arch == arch and model.crisp_config == CONFIG
    assert is_crisp(model)


def test_convert_is_seeded():
    a, b = toy_timm_vit(), toy_timm_vit()
    convert_(a, CONFIG, generator=torch.Generator().manual_seed(3))
    convert_(b, CONFIG, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_basis_is_stored_once(arch):
    model = fresh_toy(arch)
    retrofit_(model, CONFIG, progress=False)
    bases = crisp_bases(model)
    state = model.state_dict()
    params = dict(model.named_parameters())
    for key, basis in bases.items():
        assert isinstance(basis, CrispBasis) and basis.n_layers == 2
        ptrs = {model.get_submodule(n).basis.weight.data_ptr() for n in basis.layer_names}
        assert ptrs == {basis.weight.data_ptr()}
        assert all(model.get_submodule(n).basis is basis for n in basis.layer_names)
        assert [k for k, v in state.items() if v.data_ptr() == basis.weight.data_ptr()] == [f"crisp_bases.{key}.weight"]
        assert [k for k, v in params.items() if v is basis.weight] == [f"crisp_bases.{key}.weight"]
    basis_keys = [k for k in state if "crisp_bases" in k]
    assert len(basis_keys) == len(bases)
    mixer_keys = [k for k in state if k.endswith(".crisp_mixer")]
    assert len(mixer_keys) == len(crisp_layers(model))
    # parameter count: each basis once, one mixer per layer
    crisp_params = sum(p.numel() for n, p in params.items() if "crisp_" in n)
    assert crisp_params == sum(b.u * b.r + b.n_layers * b.r * b.s for b in bases.values())


def test_basis_gradient_is_the_sum_of_layer_contributions():
    model = toy_timm_vit()
    retrofit_(model, CONFIG, progress=False)
    basis = crisp_bases(model)["fc1_0_1"]
    layers = [model.get_submodule(n) for n in basis.layer_names]
    g = torch.Generator().manual_seed(0)
    probes = [torch.randn(layer.weight.shape, generator=g) for layer in layers]

    def basis_grad(which):
        basis.weight.grad = None
        loss = sum((layers[i].weight * probes[i]).sum() for i in which)
        loss.backward()
        return basis.weight.grad.clone()

    parts = [basis_grad([i]) for i in range(len(layers))]
    total = basis_grad(range(len(layers)))
    for part in parts:
        assert part.norm() > 1e-3 * total.norm()  # every layer contributes
    assert not torch.allclose(parts[0], parts[1])
    torch.testing.assert_close(total, sum(parts), rtol=1e-5, atol=1e-7)


def test_model_backward_reaches_every_basis_and_mixer(arch):
    model = fresh_toy(arch)
    retrofit_(model, CONFIG, progress=False)
    out = forward(model, example_inputs(model))
    out.square().mean().backward()
    for key, basis in crisp_bases(model).items():
        assert basis.weight.grad is not None and basis.weight.grad.abs().sum() > 0, key
    for name, layer in crisp_layers(model).items():
        assert layer.crisp_mixer.grad is not None and layer.crisp_mixer.grad.abs().sum() > 0, name


def test_sharing_survives_deepcopy_and_dtype_moves():
    model = toy_timm_vit()
    retrofit_(model, CONFIG, progress=False)
    twin = copy.deepcopy(model)
    b, tb = crisp_bases(model)["qkv_0_1"], crisp_bases(twin)["qkv_0_1"]
    assert twin.blocks[0].attn.qkv.basis is tb and twin.blocks[1].attn.qkv.basis is tb and tb is not b
    with torch.no_grad():
        tb.weight.zero_()
    assert twin.blocks[1].attn.qkv.weight.abs().sum() == 0  # the copy's layers use the copy's basis
    assert model.blocks[1].attn.qkv.weight.abs().sum() > 0
    model.double()
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float64
    inputs = {k: v.double() for k, v in example_inputs(model).items()}
    assert forward(model, inputs).dtype == torch.float64


def test_state_dict_round_trip_into_a_fresh_conversion():
    model = toy_timm_vit()
    retrofit_(model, CONFIG, progress=False)
    other = toy_timm_vit(seed=1)
    convert_(other, CONFIG)
    other.load_state_dict(model.state_dict(), strict=True)
    inputs = example_inputs(model)
    assert torch.equal(forward(other, inputs), forward(model, inputs))


def test_materialize_gives_plain_linears(arch):
    model = fresh_toy(arch)
    retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2, r=3)), progress=False)  # lossy on purpose
    inputs = example_inputs(model)
    before = forward(model, inputs)
    names = list(crisp_layers(model))
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    assert materialize_(model) is model
    assert not crisp_layers(model) and not is_crisp(model)
    assert not hasattr(model, "crisp_bases") and not hasattr(model, "crisp_config") and not hasattr(model, "crisp_arch")
    assert not any("crisp" in k for k in model.state_dict())
    for n in names:
        layer = model.get_submodule(n)
        assert type(layer) is nn.Linear
        assert torch.equal(layer.weight, dense[n]) and layer.weight.requires_grad
    torch.testing.assert_close(forward(model, inputs), before, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="no CRISP layers"):
        materialize_(model)
    retrofit_(model, CONFIG, progress=False)  # a materialized model converts again
    assert is_crisp(model)


def test_materialize_keeps_training_mode():
    model = toy_timm_vit()
    retrofit_(model, CONFIG, progress=False)
    model.train()
    materialize_(model)
    assert model.blocks[0].mlp.fc1.training


def test_already_converted_is_refused():
    model = toy_timm_vit()
    convert_(model, CONFIG)
    with pytest.raises(ConfigError, match="already a CRISP layer; materialize_"):
        convert_(model, CONFIG)
    with pytest.raises(ConfigError, match="already a CRISP layer"):
        retrofit_(model, CONFIG, progress=False)


def test_s_must_divide_the_weight():
    model = toy_timm_vit()
    with pytest.raises(ConfigError, match=r"s=5 does not divide d_in\*d_out=32\*96=3072 for role 'qkv'.*divisors") as e:
        convert_(model, CrispConfig(default=RoleConfig(s=5)))
    suggested = [int(k) for k in str(e.value).rsplit("[", 1)[1].rstrip("].").split(",")]
    assert suggested and all(3072 % k == 0 for k in suggested)  # every suggestion is a real divisor
    assert not is_crisp(model)


def test_unknown_target_role():
    with pytest.raises(ConfigError, match=r"roles \['mlp'\] are not roles of timm-vit; its roles are"):
        convert_(toy_timm_vit(), CrispConfig(targets=("fc1", "mlp")))


def test_unknown_architecture():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(UnknownArchitectureError, match="no architecture spec for Sequential.*register_architecture"):
        convert_(model)
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'gpt9'"):
        convert_(model, arch="gpt9")
    with pytest.raises(UnknownArchitectureError, match="has no submodule 'blocks'"):
        convert_(model, arch="timm-vit")


def test_layers_of_one_group_must_share_a_shape():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
            self.blocks[0].mlp, self.blocks[1].mlp = nn.Module(), nn.Module()
            self.blocks[0].mlp.fc1, self.blocks[1].mlp.fc1 = nn.Linear(8, 16), nn.Linear(8, 32)

    with pytest.raises(ConfigError, match="layers sharing a basis must have one shape: use group_size=1"):
        plan_groups(Odd(), CrispConfig(targets=("fc1",)), arch="timm-vit")
    _, plans = plan_groups(Odd(), CrispConfig(default=RoleConfig(group_size=1), targets=("fc1",)), arch="timm-vit")
    assert [(p.key, p.d_out) for p in plans] == [("fc1_0_0", 16), ("fc1_1_1", 32)]



def test_hugging_face_savers_refuse_a_crisp_model_and_work_after_materialize(tmp_path):
    """save_pretrained on a CRISP HF model would reload with freshly initialised linears: it is refused
    loudly; folded back to dense linears (materialize_) the model saves and reloads exactly."""
    import copy

    import transformers

    from crisp_edge.errors import CheckpointError
    from crisp_edge.method.config import CrispConfig, RoleConfig
    from crisp_edge.method.convert import materialize_
    from crisp_edge.testing import toy_model
    from crisp_edge.training.retrofit import retrofit_

    model = toy_model("hf-vit")
    retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2)), progress=False)
    for m in (model, copy.deepcopy(model)):
        with pytest.raises(CheckpointError, match="crisp_edge.save_checkpoint.*materialize_"):
            m.save_pretrained(tmp_path / "hf")
        with pytest.raises(CheckpointError, match="CRISP model"):
            m.push_to_hub("me/model")
    assert not (tmp_path / "hf").exists()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        want = model(x).logits
    materialize_(model)
    model.save_pretrained(tmp_path / "hf")
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-5, atol=1e-5)
