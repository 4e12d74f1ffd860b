"""Retrofit (Alg. 2): exact at full capacity, Eckart-Young optimal below it, and the gradient paths."""
from __future__ import annotations

import json
import math

import pytest
import torch

from crisp_edge import (
    ConfigError,
    CrispConfig,
    RetrofitError,
    RoleConfig,
    convert_,
    crisp_bases,
    crisp_layers,
    is_crisp,
    retrofit_,
)
from crisp_edge.method.gates import get_gate
from crisp_edge.testing import example_inputs, forward, toy_timm_vit
from crisp_edge.training.retrofit import relative_error
from tests.conftest import fresh_toy, original_weights

CONFIG = CrispConfig(default=RoleConfig(s=4, group_size=2))


def layer_errors(model, originals):
    """Relative Frobenius error of every CRISP layer against the original weights, recomputed here."""
    return {n: relative_error(layer.weight, originals[f"{n}.weight"]) for n, layer in crisp_layers(model).items()}


def stacked(basis, originals):
    """M = [W_1.reshape(u, s), ..., W_n.reshape(u, s)] in float64."""
    return torch.cat([originals[f"{n}.weight"].double().reshape(basis.u, basis.s) for n in basis.layer_names], dim=1)


def test_full_capacity_is_exact(arch):
    model = fresh_toy(arch)
    originals, inputs = original_weights(model), example_inputs(model)
    expected = forward(model, inputs)
    report = retrofit_(model, CONFIG, progress=False)
    errors = layer_errors(model, originals)
    assert len(errors) == len(report.layers) > 0
    assert max(errors.values()) <= 1e-5
    assert report.max_error <= 1e-5
    for fit in report.layers:
        assert fit.rel_error == pytest.approx(errors[fit.name], abs=1e-9)
    for b in crisp_bases(model).values():
        assert b.r == b.full_rank == b.n_layers * b.s
    torch.testing.assert_close(forward(model, inputs), expected, rtol=1e-4, atol=1e-5)
    # untouched parameters (embeddings, norms, heads) and biases are bit-identical
    for name, p in model.named_parameters():
        if name in originals and "crisp" not in name:
            assert torch.equal(p, originals[name]), name


@pytest.mark.parametrize("gate, placement", [
    ("gelu", "pre"), ("none", "pre"), ("silu", "temp"), ("gelu", "temp"), ("none", "temp"), ("none", "post"),
])
def test_full_capacity_is_exact_for_other_gates(gate, placement):
    model = toy_timm_vit()
    originals, inputs = original_weights(model), example_inputs(model)
    expected = forward(model, inputs)
    retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2, gate=gate, placement=placement)), progress=False)
    assert max(layer_errors(model, originals).values()) <= 1e-5
    torch.testing.assert_close(forward(model, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("placement", ["pre", "temp"])
def test_over_complete_basis_is_exact_and_trainable(placement):
    model = toy_timm_vit()
    originals, inputs = original_weights(model), example_inputs(model)
    expected = forward(model, inputs)
    retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2, r=8 + 5, placement=placement)), progress=False)
    assert max(layer_errors(model, originals).values()) <= 1e-5
    torch.testing.assert_close(forward(model, inputs), expected, rtol=1e-4, atol=1e-5)
    forward(model, inputs).square().mean().backward()
    for name, layer in crisp_layers(model).items():
        b = layer.basis
        assert b.r == 13 and layer.crisp_mixer.shape == (13, 4)
        extra_rows = layer.crisp_mixer.grad[b.full_rank:]
        assert extra_rows.abs().sum(dim=1).min() > 0, name  # every padding row of every mixer can learn
    for key, b in crisp_bases(model).items():
        assert b.weight.shape == (b.u, 13)
        assert b.weight[:, b.full_rank:].abs().sum() > 0, key  # padding columns are not dead zeros


@pytest.mark.parametrize("r", [1, 3, 6])
def test_below_capacity_matches_truncated_svd(arch, r):
    model = fresh_toy(arch)
    originals = original_weights(model)
    report = retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2, r=r)), progress=False)
    for key, b in crisp_bases(model).items():
        m = stacked(b, originals)
        sv = torch.linalg.svdvals(m)
        optimal = float((sv[r:] ** 2).sum().sqrt() / m.norm())
        residual = sum((model.get_submodule(n).weight.detach().double() - originals[f"{n}.weight"].double())
                       .square().sum() for n in b.layer_names)
        achieved = float(residual.sqrt() / m.norm())
        assert optimal > 1e-3  # genuinely lossy
        assert achieved == pytest.approx(optimal, rel=1e-6), key
    assert max(report.group_errors().values()) > 1e-3


def test_more_rank_never_hurts():
    errors = []
    for r in (2, 4, 6, 8):
        model = toy_timm_vit()
        config = CrispConfig(default=RoleConfig(s=4, group_size=2, r=r))
        errors.append(retrofit_(model, config, progress=False).max_error)
    assert errors == sorted(errors, reverse=True) and errors[-1] <= 1e-5


def test_mixers_sit_where_the_gate_is_sloped():
    model = toy_timm_vit()
    config = CrispConfig(default=RoleConfig(s=4, group_size=2), gate_init_max=0.1)
    retrofit_(model, config, progress=False)
    silu = get_gate("silu")
    for key, b in crisp_bases(model).items():
        gated = torch.cat([silu.fn(model.get_submodule(n).crisp_mixer.detach()) for n in b.layer_names], dim=1)
        # each rank component (row) is scaled so its largest |coefficient| is gate_init_max
        torch.testing.assert_close(gated.abs().amax(dim=1), torch.full((b.r,), 0.1), rtol=1e-5, atol=1e-6)
        mixers = torch.cat([model.get_submodule(n).crisp_mixer.detach() for n in b.layer_names], dim=1)
        assert mixers.abs().max() < 0.25  # small |A|, like the paper's N(0, 0.01) init, far from argmin -1.28
        a = mixers.clone().requires_grad_(True)
        silu.fn(a).sum().backward()
        assert a.grad.min() > 0.35, key  # well sloped everywhere (0.5 at A = 0, 0 at the minimum)


def test_deterministic():
    a, b = toy_timm_vit(), toy_timm_vit()
    config = CrispConfig(default=RoleConfig(s=4, group_size=2, r=11))
    retrofit_(a, config, progress=False, seed=5)
    retrofit_(b, config, progress=False, seed=5)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_gradient_method_improves_on_its_random_init():
    model = toy_timm_vit()
    originals = original_weights(model)
    init = toy_timm_vit()
    convert_(init, CONFIG, generator=torch.Generator().manual_seed(0))  # the init retrofit_(seed=0) starts from
    init_error = max(layer_errors(init, originals).values())
    report = retrofit_(model, CONFIG, method="gradient", steps=100, progress=False, seed=0)
    assert report.method == "gradient" and report.refine_steps == 0
    errors = layer_errors(model, originals)
    assert init_error > 1.0
    assert max(errors.values()) < 0.2 * init_error
    assert report.max_error == pytest.approx(max(errors.values()))


def test_gradient_method_handles_gates_without_closed_form():
    model = toy_timm_vit(depth=2)
    originals = original_weights(model)
    config = CrispConfig(default=RoleConfig(s=4, group_size=2, gate="relu"), targets=("fc1",))
    report = retrofit_(model, config, method="gradient", steps=60, lr=3e-2, progress=False)
    assert report.max_error < 0.9
    assert max(layer_errors(model, originals).values()) == pytest.approx(report.max_error)


def test_refinement_keeps_the_exact_fit():
    model = toy_timm_vit()
    originals = original_weights(model)
    report = retrofit_(model, CONFIG, refine_steps=20, progress=False)
    assert report.refine_steps == 20
    assert max(layer_errors(model, originals).values()) <= 1e-5  # keep_best: refining cannot undo an exact fit


def test_refinement_below_capacity_stays_near_the_optimum():
    config = CrispConfig(default=RoleConfig(s=4, group_size=2, r=4))
    closed = retrofit_(toy_timm_vit(), config, progress=False)
    refined = retrofit_(toy_timm_vit(), config, refine_steps=20, progress=False)
    # smooth-L1 is not the Frobenius norm, so the Eckart-Young optimum may move a little, not far
    for key, err in closed.group_errors().items():
        assert refined.group_errors()[key] <= 1.02 * err


@pytest.mark.parametrize("role_config, message", [
    (RoleConfig(gate="relu"), r"'relu' is not.*use method='gradient'"),
    (RoleConfig(placement="post"), r"placement 'post'.*use method='gradient'"),
    (RoleConfig(gate="gelu", placement="post"), r"placement 'post'.*use method='gradient'"),
])
def test_closed_form_refuses_what_it_cannot_invert(role_config, message):
    model = toy_timm_vit()
    with pytest.raises(RetrofitError, match=message):
        retrofit_(model, CrispConfig(default=role_config), progress=False)
    assert not is_crisp(model)  # refused before anything changed


@pytest.mark.parametrize("gate, gate_init_max", [("gelu", 0.2), ("gelu", 0.17)])
def test_gate_init_max_beyond_the_gate_minimum_is_refused_up_front(gate, gate_init_max):
    model = toy_timm_vit()
    config = CrispConfig(default=RoleConfig(gate=gate), gate_init_max=gate_init_max)
    with pytest.raises(ConfigError, match=f"gate_init_max={gate_init_max}.*minimum"):
        retrofit_(model, config, progress=False)
    assert not is_crisp(model)
    originals = original_weights(model)
    retrofit_(model, CrispConfig(default=RoleConfig(gate=gate), gate_init_max=0.16), progress=False)
    assert max(layer_errors(model, originals).values()) <= 1e-5


def test_silu_takes_the_largest_gate_init_max():
    model = toy_timm_vit()
    originals = original_weights(model)
    retrofit_(model, CrispConfig(gate_init_max=0.26), progress=False)
    assert max(layer_errors(model, originals).values()) <= 1e-5


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(value):
    model = toy_timm_vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[3, 7] = value
    with pytest.raises(RetrofitError, match=r"blocks\.1\.mlp\.fc2\.weight contains NaN or Inf"):
        retrofit_(model, CONFIG, progress=False)
    assert not is_crisp(model)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "magic"}, "method must be one of"),
    ({"refine_steps": -1}, "refine_steps must be a non-negative integer"),
    ({"refine_steps": 2.5}, "refine_steps must be a non-negative integer"),
])
def test_bad_arguments(kwargs, message):
    model = toy_timm_vit()
    with pytest.raises(ConfigError, match=message):
        retrofit_(model, CONFIG, progress=False, **kwargs)
    assert not is_crisp(model)


def test_report_and_budget():
    model = toy_timm_vit()
    report = retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2, r=6)), progress=False)
    assert set(report.group_errors()) == set(crisp_bases(model))
    assert len(report.layers) == 16 and report.seconds >= 0
    d = json.loads(json.dumps(report.to_dict()))
    assert d["method"] == "svd" and d["max_rel_error"] == report.max_error and len(d["layers"]) == 16
    text = report.format()
    for key in crisp_bases(model):
        assert key in text
    assert "worst layer error" in text and "method=svd" in text
    assert report.budget.trainable_per_task == 16 * 6 * 4
    assert not math.isnan(report.budget.compression)
