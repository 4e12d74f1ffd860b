"""Gates: values, minima, inverses on the increasing branch, and the three placements."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crisp_edge import GATES, PLACEMENTS
from crisp_edge.errors import ConfigError
from crisp_edge.method.gates import crisp_weight_matrix, get_gate

INVERTIBLE_BOUNDED = ("silu", "gelu")


def test_registry():
    assert set(GATES) == {"silu", "gelu", "none", "relu"}
    assert PLACEMENTS == ("pre", "post", "temp")


@pytest.mark.parametrize("name, reference", [
    ("silu", lambda a: torch.sigmoid(a) * a), ("gelu", F.gelu), ("none", lambda a: a), ("relu", torch.relu),
])
def test_gate_values(name, reference):
    a = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(get_gate(name).fn(a), reference(a), rtol=0, atol=0)


@pytest.mark.parametrize("name, minimum", [("silu", -0.278464542761074), ("gelu", -0.1699712074799)])
def test_argmin_is_the_minimiser(name, minimum):
    gate = get_gate(name)
    assert gate.min_value == pytest.approx(minimum, abs=1e-8)
    a = torch.tensor([gate.argmin - 1e-3, gate.argmin + 1e-3], dtype=torch.float64)
    assert bool((gate.fn(a) > gate.min_value).all())
    x = torch.tensor(gate.argmin, dtype=torch.float64, requires_grad=True)
    gate.fn(x).backward()
    assert abs(float(x.grad)) < 1e-8  # slope 0 at the minimum


def test_unbounded_gates_have_no_minimum():
    assert get_gate("none").min_value == -math.inf
    assert get_gate("relu").min_value == -math.inf


@pytest.mark.parametrize("name", INVERTIBLE_BOUNDED)
def test_inverse_round_trips_on_the_branch(name):
    gate = get_gate(name)
    c = torch.cat([torch.linspace(gate.min_value + 1e-9, 0.3, 500, dtype=torch.float64),
                   torch.linspace(0.3, 20.0, 500, dtype=torch.float64)])
    a = gate.inverse(c)
    assert a.dtype == torch.float64
    assert bool((a >= gate.argmin).all())
    assert float((gate.fn(a) - c).abs().max()) <= 1e-12
    # and the other way round, away from the flat minimum where the inverse is ill-conditioned
    a0 = torch.linspace(gate.argmin + 0.05, 10.0, 1000, dtype=torch.float64)
    assert float((gate.inverse(gate.fn(a0)) - a0).abs().max()) <= 1e-12


def test_inverse_of_the_minimum_is_the_argmin():
    gate = get_gate("silu")
    a = gate.inverse(torch.tensor([gate.min_value], dtype=torch.float64))
    assert float(a) == pytest.approx(gate.argmin, abs=1e-6)


def test_inverse_accepts_float32_and_keeps_shape():
    c = torch.rand(3, 5) * 0.2 - 0.1
    a = get_gate("silu").inverse(c)
    assert a.shape == (3, 5) and a.dtype == torch.float64
    torch.testing.assert_close(get_gate("silu").fn(a), c.double(), rtol=0, atol=1e-12)


def test_none_inverse_is_identity_and_a_copy():
    c = torch.randn(4, 4, dtype=torch.float64) * 10
    a = get_gate("none").inverse(c)
    assert torch.equal(a, c) and a.data_ptr() != c.data_ptr()


def test_relu_is_not_invertible():
    with pytest.raises(ConfigError, match="not invertible.*gradient"):
        get_gate("relu").inverse(torch.zeros(3))


@pytest.mark.parametrize("name", INVERTIBLE_BOUNDED)
def test_values_below_the_minimum_are_refused(name):
    gate = get_gate(name)
    c = torch.tensor([0.1, gate.min_value - 1e-3], dtype=torch.float64)
    with pytest.raises(ConfigError, match=f"gate '{name}' cannot produce .*minimum"):
        gate.inverse(c)


def test_unknown_gate():
    with pytest.raises(ConfigError, match="unknown gate 'tanh'.*silu"):
        get_gate("tanh")


@pytest.mark.parametrize("gate_name", sorted(GATES))
def test_placements(gate_name):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(12, 3, generator=g, dtype=torch.float64)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    gate = get_gate(gate_name)
    torch.testing.assert_close(crisp_weight_matrix(b, a, gate, "pre"), b @ gate.fn(a))
    torch.testing.assert_close(crisp_weight_matrix(b, a, gate, "post"), gate.fn(b @ a))
    torch.testing.assert_close(crisp_weight_matrix(b, a, gate, "temp"), gate.fn(b) @ a)
    with pytest.raises(ConfigError, match="unknown placement 'mid'"):
        crisp_weight_matrix(b, a, gate, "mid")


def test_placements_differ_for_a_nonlinear_gate():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(6, 2, generator=g), torch.randn(2, 3, generator=g)
    gate = get_gate("silu")
    pre, post, temp = (crisp_weight_matrix(b, a, gate, p) for p in PLACEMENTS)
    assert not torch.allclose(pre, post) and not torch.allclose(pre, temp) and not torch.allclose(post, temp)
