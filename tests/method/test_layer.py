"""CrispBasis / CrispLinear on their own: the weight formula, what a layer registers, and bias handling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crisp_edge import CrispBasis, CrispConfig, CrispLinear, RoleConfig, convert_
from crisp_edge.method.gates import get_gate
from crisp_edge.testing import toy_timm_vit


def make(placement="pre", gate="silu", bias=True, d_in=6, d_out=4, s=3, r=5):
    basis = CrispBasis("fc", ["a", "b"], d_in=d_in, d_out=d_out, s=s, r=r, gate=gate, placement=placement,
                       dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        basis.weight.copy_(torch.randn(basis.weight.shape, generator=g, dtype=torch.float64))
    layers = [CrispLinear(basis, bias=bias) for _ in range(2)]
    with torch.no_grad():
        for layer in layers:
            layer.crisp_mixer.copy_(torch.randn(layer.crisp_mixer.shape, generator=g, dtype=torch.float64))
            if bias:
                layer.bias.copy_(torch.randn(d_out, generator=g, dtype=torch.float64))
    return basis, layers


def test_basis_layout():
    basis, _ = make()
    assert (basis.u, basis.r, basis.n_layers, basis.full_rank) == (8, 5, 2, 6)
    assert basis.weight.shape == (8, 5) and basis.weight.dtype == torch.float64
    assert "u=8, r=5, s=3" in repr(basis)
    assert CrispBasis("fc", ["a"] * 5, d_in=2, d_out=2, s=2, r=2).full_rank == 2  # capped by u


@pytest.mark.parametrize("placement", ["pre", "post", "temp"])
@pytest.mark.parametrize("gate", ["silu", "gelu", "none", "relu"])
def test_weight_is_a_row_major_reshape(placement, gate):
    basis, (layer, _) = make(placement=placement, gate=gate)
    fn = get_gate(gate).fn
    b, a = basis.weight, layer.crisp_mixer
    m = {"pre": b @ fn(a), "post": fn(b @ a), "temp": fn(b) @ a}[placement]
    assert layer.weight.shape == (4, 6)
    torch.testing.assert_close(layer.weight.reshape(8, 3), m, rtol=0, atol=0)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


def test_layers_reference_the_basis_without_registering_it():
    basis, (first, second) = make()
    assert first.basis is basis and second.basis is basis
    assert set(dict(first.named_parameters())) == {"crisp_mixer", "bias"}
    assert set(first.state_dict()) == {"crisp_mixer", "bias"}
    assert list(first.children()) == []
    assert first.crisp_mixer.shape == (5, 3) and first.crisp_mixer.dtype == torch.float64
    with torch.no_grad():  # the layer sees changes to the shared basis at once
        basis.weight.mul_(2)
    torch.testing.assert_close(first.weight.reshape(8, 3), basis.weight @ F.silu(first.crisp_mixer))


def test_no_bias():
    _, (layer, _) = make(bias=False)
    assert layer.bias is None and "bias=False" in repr(layer)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)


def test_converted_layer_repr_and_formula():
    model = convert_(toy_timm_vit(), CrispConfig(default=RoleConfig(s=4, group_size=2)))
    layer = model.blocks[2].mlp.fc2
    assert isinstance(layer, CrispLinear) and (layer.in_features, layer.out_features) == (128, 32)
    b = layer.basis
    torch.testing.assert_close(layer.weight, (b.weight @ F.silu(layer.crisp_mixer)).reshape(32, 128))
    assert "r=8, s=4, gate=silu" in repr(layer)


def test_transposed_group_reshapes_the_transposed_weight():
    """transpose=True: W.T.reshape(u, s) == B @ G(A); to_folded / from_folded are each other's inverse."""
    basis = CrispBasis("fc", ["a"], d_in=6, d_out=4, s=4, r=3, dtype=torch.float64, transpose=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        basis.weight.copy_(torch.randn(basis.weight.shape, generator=g, dtype=torch.float64))
    layer = CrispLinear(basis, bias=False)
    with torch.no_grad():
        layer.crisp_mixer.copy_(torch.randn(layer.crisp_mixer.shape, generator=g, dtype=torch.float64))
    a = layer.crisp_mixer
    product = basis.weight @ (torch.sigmoid(a) * a)  # (u, s) = (6, 4): W.T
    assert basis.folded_dense_shape == (6, 4) and "transpose=True" in repr(basis)
    torch.testing.assert_close(layer.weight, product.reshape(6, 4).T)
    torch.testing.assert_close(basis.to_folded(layer.weight), product)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert torch.equal(basis.from_folded(basis.to_folded(w)), w)


def test_transposed_role_retrofits_exactly_and_records_its_layout():
    """A transposed role with s = d_out shares an input-side basis; the closed-form retrofit is exact."""
    from crisp_edge import retrofit_
    from crisp_edge.method.convert import group_layout

    model = toy_timm_vit(depth=2)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = model(x)
    fc2 = model.blocks[0].mlp.fc2
    config = CrispConfig(default=RoleConfig(s=4, group_size=2), roles={"fc2": RoleConfig(s=fc2.out_features, transpose=True)})
    retrofit_(model, config, progress=False)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    layout = group_layout(model)
    assert layout["fc2_0_1"]["transpose"] is True and layout["fc2_0_1"]["s"] == fc2.out_features
    assert "transpose" not in layout["fc1_0_1"]
