"""The calibration-whitened student init (``init_student(..., init="svd-whitened")``, ``whitened_factors``)."""
from __future__ import annotations

import pytest
import torch

from crisp_edge.errors import ConfigError
from crisp_edge.method.budget import budget
from crisp_edge.method.config import CrispConfig, RoleConfig
from crisp_edge.method.convert import crisp_bases, crisp_layers
from crisp_edge.testing import toy_timm_vit
from crisp_edge.training.compress import (
    allocate_ranks,
    capture_linear_inputs,
    compress_vit,
    init_student,
)
from crisp_edge.training.compress.ranks import layer_input_stats
from crisp_edge.training.compress.whitened import weighted_error, whitened_factors
from crisp_edge.training.retrofit import best_rank_factors, retrofit_

# the toy's layers: qkv 32 -> 96, proj 32 -> 32, fc1 32 -> 128, fc2 128 -> 32
D_IN = {"qkv": 32, "proj": 32, "fc1": 32, "fc2": 128}
D_OUT = {"qkv": 96, "proj": 32, "fc1": 128, "fc2": 32}
LAYOUTS = {
    # s < d_in: the fold splits the inputs between basis and mixer side (alternating least squares)
    "s4": CrispConfig(default=RoleConfig(s=4, group_size=2)),
    # s = d_in: an output-side basis (principal_basis, exact)
    "s_in": CrispConfig(default=RoleConfig(s=4, group_size=2),
                        roles={r: RoleConfig(s=d, group_size=2) for r, d in D_IN.items()}),
    # transposed, s = d_out: an input-side basis (Basis Sharing's whitening + per-layer re-solve)
    "s_out_t": CrispConfig(default=RoleConfig(s=4, group_size=2),
                           roles={r: RoleConfig(s=d, group_size=2, transpose=True) for r, d in D_OUT.items()}),
}
RANKS = {"qkv": 3, "proj": 2, "fc1": 3, "fc2": 2}


def _images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _teacher(layout: str) -> torch.nn.Module:
    model = toy_timm_vit(seed=0)
    retrofit_(model, LAYOUTS[layout], progress=False)
    return model


def _output_error(student, teacher, calib) -> float:
    names = sorted(crisp_layers(teacher))
    t, s = crisp_layers(teacher), crisp_layers(student)
    return weighted_error([t[n].weight.detach() for n in names], [s[n].weight.detach() for n in names],
                          [calib.gram[n] for n in names])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_whitened_init_has_less_output_error_on_the_calibration_inputs_at_the_same_ranks(layout):
    teacher = _teacher(layout)
    calib = capture_linear_inputs(teacher, list(_images().split(16)))
    plain = init_student(teacher, RANKS, init="svd")
    whitened = init_student(teacher, RANKS, init="svd-whitened", calib_inputs=calib)
    assert _output_error(whitened, teacher, calib) < 0.97 * _output_error(plain, teacher, calib)
    # the same student shape and the same stored budget: only the values of the factors differ
    assert {n: p.shape for n, p in whitened.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    assert budget(whitened).stored == budget(plain).stored < budget(teacher).stored
    assert {k: b.r for k, b in crisp_bases(whitened).items()} == {k: RANKS[b.role] for k, b in crisp_bases(plain).items()}
    # ... and on inputs it was not fitted to, the model's output is closer to the teacher's too
    x = _images(32, seed=7)
    with torch.no_grad():
        ref = teacher(x)
        assert (whitened(x) - ref).square().mean() < (plain(x) - ref).square().mean()


def test_with_isotropic_inputs_the_whitened_factors_are_the_plain_svd():
    w = [torch.randn(12, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]
    eye = [torch.eye(16, dtype=torch.float64)] * 3
    p, q = whitened_factors(w, eye, 4, False, 5)  # s=4 < d_in: the alternating path, from the SVD optimum
    stacked = torch.cat([t.reshape(48, 4) for t in w], 1)
    bp, bq = best_rank_factors(stacked, 5)
    torch.testing.assert_close(p @ q, bp @ bq, rtol=1e-4, atol=1e-5)  # up to the solves' ridge


def test_whitened_factors_reach_the_optimum_of_the_directions_the_inputs_excite():
    # inputs that live almost only on the first 4 input channels (folded row (o, 0), s = 4): the best the
    # whitened fit can do is the best rank-2 fit of those columns under their Gram, while the plain SVD
    # spends its rank on the large columns the inputs never excite
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(8, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    for t in w:
        t[:, 4:] *= 10
    x = torch.cat([torch.randn(200, 4, generator=g, dtype=torch.float64), 1e-3 * torch.randn(200, 12, generator=g,
                                                                                              dtype=torch.float64)], 1)
    grams = [x.T @ x] * 2
    p, q = whitened_factors(w, grams, 4, False, 2)
    approx = [(p @ q[:, 4 * i:4 * (i + 1)]).reshape(8, 16) for i in range(2)]
    bp, bq = best_rank_factors(torch.cat([t.reshape(32, 4) for t in w], 1), 2)
    plain = [(bp @ bq[:, 4 * i:4 * (i + 1)]).reshape(8, 16) for i in range(2)]
    sf = torch.linalg.cholesky(grams[0][:4, :4])
    excited = torch.linalg.svdvals(torch.cat([t[:, :4] @ sf for t in w], 1))[2:].square().sum()
    assert weighted_error(w, approx, grams) <= 1.001 * float(excited)  # (the tiny channels help a little)
    assert weighted_error(w, approx, grams) < 0.6 * weighted_error(w, plain, grams)


def test_default_init_is_the_plain_svd_even_with_calibration_inputs():
    # whitened bases fit the calibration data's distribution but adapt worse to other tasks (distill.py's
    # docstring has the numbers): the whitened init is asked for, never chosen silently
    teacher = _teacher("s4")
    calib = capture_linear_inputs(teacher, [_images(32)])
    x = _images(4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(init_student(teacher, RANKS, calib_inputs=calib)(x),
                                   init_student(teacher, RANKS, init="svd")(x))
        torch.testing.assert_close(init_student(teacher, RANKS)(x), init_student(teacher, RANKS, init="svd")(x))
        assert (init_student(teacher, RANKS)(x)
                - init_student(teacher, RANKS, init="svd-whitened", calib_inputs=calib)(x)).abs().max() > 1e-5


def test_compress_vit_whitens_by_its_calibration_inputs_on_request_and_defaults_to_the_plain_svd():
    teacher = _teacher("s4")
    x = _images(32)
    student, report = compress_vit(teacher, 0.5, x, init="svd-whitened", distill=False, progress=False)
    assert report.init == "svd-whitened"
    stats = layer_input_stats(teacher, crisp_layers(teacher), x[:64])
    same = init_student(teacher, report.plan, init="svd-whitened", calib_inputs=stats)
    plain, plain_report = compress_vit(teacher, 0.5, x, distill=False, progress=False)
    assert plain_report.init == "svd"
    free, free_report = compress_vit(teacher, 0.5, None, distill=False, progress=False)
    assert free_report.init == "svd"
    with torch.no_grad():
        torch.testing.assert_close(student(x[:4]), same(x[:4]))
        torch.testing.assert_close(plain(x[:4]), init_student(teacher, plain_report.plan, init="svd")(x[:4]))
        torch.testing.assert_close(free(x[:4]), init_student(teacher, free_report.plan, init="svd")(x[:4]))
        assert (student(x[:4]) - plain(x[:4])).abs().max() > 1e-5


def test_whitened_init_refuses_missing_or_partial_calibration_inputs_and_unsupported_layouts():
    teacher = _teacher("s4")
    with pytest.raises(ConfigError, match="needs calib_inputs"):
        init_student(teacher, RANKS, init="svd-whitened")
    with pytest.raises(ConfigError, match="needs calib_inputs"):
        compress_vit(teacher, 0.5, None, init="svd-whitened", distill=False, progress=False)
    partial = capture_linear_inputs(teacher, [_images(8)], names=["blocks.0.attn.qkv"])
    with pytest.raises(ConfigError, match="has no inputs of"):
        init_student(teacher, RANKS, init="svd-whitened", calib_inputs=partial)
    w = [torch.randn(8, 16, dtype=torch.float64)] * 2
    with pytest.raises(ConfigError, match="needs s = d_out"):
        whitened_factors(w, [torch.eye(16, dtype=torch.float64)] * 2, 4, True, 2)


def test_greedy_ranks_for_the_whitened_init_measure_the_whitened_factors_and_fit_the_budget():
    teacher = _teacher("s4")
    calib = _images(32)
    plan = allocate_ranks(teacher, 0.4, "greedy", calib=calib, init="svd-whitened")
    plain = allocate_ranks(teacher, 0.4, "greedy", calib=calib)
    assert plan.stored <= plan.target == plain.target
    student = init_student(teacher, plan, init="svd-whitened", calib_inputs=layer_input_stats(teacher, crisp_layers(teacher), calib))
    assert budget(student).stored == plan.stored
    # the error it records is the whitened factors' (below the plain SVD's at the same rank, on the same inputs)
    stats = layer_input_stats(teacher, crisp_layers(teacher), calib)
    layers = crisp_layers(teacher)
    for role, r in plan.role_ranks.items():
        names = [n for b in crisp_bases(teacher).values() if b.role == role for n in b.layer_names]
        if r == plan.full_ranks[role]:
            assert plan.errors[role] == 0.0
            continue
        plain_student = init_student(teacher, plan, init="svd")
        errs = {}
        for kind, st in (("whitened", student), ("plain", plain_student)):
            errs[kind] = sum(weighted_error([layers[n].weight.detach()], [crisp_layers(st)[n].weight.detach()],
                                            [stats.gram[n]]) / weighted_error([layers[n].weight.detach()],
                                                                              [torch.zeros_like(layers[n].weight)],
                                                                              [stats.gram[n]]) for n in names)
        # fewer alternating steps than the init's: between the init's error and the plain SVD's
        assert errs["whitened"] - 1e-9 <= plan.errors[role] < errs["plain"]
    with pytest.raises(ConfigError, match="need calib"):
        allocate_ranks(teacher, 0.4, "greedy", init="svd-whitened")


def test_a_layout_the_whitened_init_does_not_support_is_refused_when_asked_for():
    model = toy_timm_vit(seed=0)
    retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2, transpose=True)), progress=False)
    x = _images(16)
    student, report = compress_vit(model, 0.5, x, distill=False, progress=False)
    assert report.init == "svd"
    with torch.no_grad():
        torch.testing.assert_close(student(x[:4]), init_student(model, report.plan, init="svd")(x[:4]))
    with pytest.raises(ConfigError):
        compress_vit(model, 0.5, x, init="svd-whitened", distill=False, progress=False)
