"""ViT compression (Alg. 4): rank allocation, SVD-initialised student, distillation, checkpoints, CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from crisp_edge.errors import CheckpointError, ConfigError
from crisp_edge.files.checkpoint import load_checkpoint, save_checkpoint
from crisp_edge.method.budget import budget
from crisp_edge.method.config import CrispConfig, RoleConfig
from crisp_edge.method.convert import crisp_bases, crisp_layers
from crisp_edge.testing import toy_timm_vit
from crisp_edge.training.compress import (
    DistillConfig,
    allocate_ranks,
    compress_vit,
    distill_,
    init_student,
)
from crisp_edge.training.compress.distill import heldout_loss
from crisp_edge.training.retrofit import best_rank_factors, retrofit_

CONFIG = CrispConfig(default=RoleConfig(s=4, group_size=2))  # 4 blocks -> 2 groups per role, full rank 8


def _teacher(seed: int = 0) -> nn.Module:
    model = toy_timm_vit(seed=seed)
    retrofit_(model, CONFIG, progress=False)
    return model


def _images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _roles(model) -> set[str]:
    return {b.role for b in crisp_bases(model).values()}


def test_svd_init_at_teacher_rank_reproduces_the_teacher_exactly():
    teacher = _teacher()
    x = _images(8)
    student = init_student(teacher, {role: 8 for role in _roles(teacher)})
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-5)
    for name, layer in crisp_layers(student).items():
        torch.testing.assert_close(layer.weight, crisp_layers(teacher)[name].weight, rtol=1e-5, atol=1e-6)
    assert all(b.r == 8 for b in crisp_bases(student).values())
    assert student is not teacher and crisp_bases(teacher)["qkv_0_1"].weight is not crisp_bases(student)["qkv_0_1"].weight


def test_svd_init_from_a_reduced_teacher_at_its_rank_is_exact_too():
    reduced = init_student(_teacher(), {role: 3 for role in _roles(_teacher())})
    again = init_student(reduced, {role: 3 for role in _roles(reduced)})
    x = _images(8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), reduced(x), rtol=1e-5, atol=1e-5)


def test_svd_init_below_rank_is_the_best_rank_r_fit_of_each_group():
    teacher = _teacher()
    student = init_student(teacher, {"qkv": 3, "proj": 5, "fc1": 2, "fc2": 8})
    t_layers, s_layers = crisp_layers(teacher), crisp_layers(student)
    for basis in crisp_bases(student).values():
        stacked = torch.cat([t_layers[n].weight.detach().double().reshape(basis.u, basis.s)
                             for n in basis.layer_names], 1)
        p, q = best_rank_factors(stacked, basis.r)
        best = p @ q
        for i, n in enumerate(basis.layer_names):
            torch.testing.assert_close(s_layers[n].weight.detach().double().reshape(basis.u, basis.s),
                                       best[:, i * basis.s:(i + 1) * basis.s], rtol=1e-4, atol=1e-5)


def test_random_init_differs_and_bad_ranks_are_refused():
    teacher = _teacher()
    x = _images(4)
    student = init_student(teacher, {role: 8 for role in _roles(teacher)}, init="random")
    with torch.no_grad():
        assert (student(x) - teacher(x)).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="in \\[1, 8\\]"):
        init_student(teacher, {"qkv": 9, "proj": 1, "fc1": 1, "fc2": 1})
    with pytest.raises(ConfigError, match="missing"):
        init_student(teacher, {"qkv": 2})
    with pytest.raises(ConfigError, match="init must be"):
        init_student(teacher, {role: 2 for role in _roles(teacher)}, init="eigen")
    with pytest.raises(ConfigError, match="retrofit it first"):
        init_student(toy_timm_vit(), {"qkv": 2})


@pytest.mark.parametrize("method", ["uniform", "greedy"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75, 1.0])
def test_rank_plans_fit_the_budget_and_the_student_stores_exactly_that(method, keep):
    teacher = _teacher()
    plan = allocate_ranks(teacher, keep, method, calib=_images(16) if method == "greedy" else None)
    assert plan.original == budget(teacher).original
    assert plan.target == int(keep * plan.original)
    assert plan.stored <= plan.target
    student = init_student(teacher, plan)
    assert budget(student).stored == plan.stored
    # no role could take one more rank within the budget (uniform and greedy both fill until nothing fits)
    costs = {}
    for b in crisp_bases(teacher).values():
        costs[b.role] = costs.get(b.role, 0) + b.u + b.n_layers * b.s
    assert all(plan.role_ranks[r] == plan.full_ranks[r] or costs[r] > plan.target - plan.stored for r in costs)


def test_uniform_ranks_keep_roles_near_the_same_fraction():
    plan = allocate_ranks(_teacher(), 0.5, "uniform")
    fractions = [plan.role_ranks[r] / plan.full_ranks[r] for r in plan.role_ranks]
    assert max(fractions) - min(fractions) <= 0.25 + 1e-9  # within two ranks of 8


def test_greedy_spends_the_budget_where_the_error_drops_most():
    """fc1's groups are exactly rank 1 in CRISP form: greedy gives it nothing beyond rank 1, uniform does."""
    teacher = toy_timm_vit()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for first in (0, 2):
            w = teacher.blocks[first].mlp.fc1.weight
            u, s = w.numel() // 4, 4
            b0 = torch.randn(u, 1, generator=g) * w.std()
            for blk in teacher.blocks[first:first + 2]:
                blk.mlp.fc1.weight.copy_((b0 @ torch.randn(1, s, generator=g)).reshape(w.shape))
    retrofit_(teacher, CONFIG, progress=False)
    for calib in (_images(16), None):  # output error and weight error
        plan = allocate_ranks(teacher, 0.5, "greedy", calib=calib)
        assert plan.role_ranks["fc1"] == 1 and plan.errors["fc1"] < 1e-10
        assert any(plan.role_ranks[r] > 4 for r in ("qkv", "proj", "fc2"))
    assert allocate_ranks(teacher, 0.5, "uniform").role_ranks["fc1"] >= 3


@pytest.mark.parametrize("kwargs, needle", [
    ({"keep_fraction": 0.0}, "keep_fraction must be in"),
    ({"keep_fraction": 1.5}, "keep_fraction must be in"),
    ({"keep_fraction": 0.01}, "rank 1 in every group already needs"),
    ({"keep_fraction": 0.5, "method": "best"}, "method must be one of"),
])
def test_impossible_or_bad_budgets_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        allocate_ranks(_teacher(), **kwargs)


def _agreement_error(student, teacher, x) -> float:
    """The distillation loss (logit KL + block-feature MSE) on held-out inputs."""
    return heldout_loss(student, teacher, x)


def test_distillation_brings_a_compressed_student_closer_to_its_teacher():
    teacher = _teacher()
    x = _images(128)
    student = init_student(teacher, {"qkv": 2, "proj": 2, "fc1": 2, "fc2": 2})
    before = _agreement_error(student, teacher, _images(64, seed=7))
    teacher_state = copy.deepcopy(teacher.state_dict())
    report = distill_(student, teacher, x, DistillConfig(epochs=3, batch_size=32, lr=3e-4), progress=False)
    after = _agreement_error(student, teacher, _images(64, seed=7))
    assert after < 0.5 * before
    assert report.steps == 12 and report.samples == 128 and report.world_size == 1
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert report.seconds > 0 and report.peak_rss_mb > 0 and report.trainable_params > 0
    for k, v in teacher.state_dict().items():  # the teacher is never trained
        assert torch.equal(v, teacher_state[k]), k
    assert all(p.requires_grad for p in student.parameters()) and not student.training


def test_distillation_is_generic_a_plain_student_trains_too():
    """Baselines are plain modules of the same architecture: the loop only needs matching blocks."""
    teacher = toy_timm_vit(seed=0)
    student = toy_timm_vit(seed=3)
    x = _images(96)
    before = _agreement_error(student, teacher, _images(64, seed=7))
    distill_(student, teacher, x, DistillConfig(epochs=3, batch_size=32, lr=3e-3), progress=False)
    assert _agreement_error(student, teacher, _images(64, seed=7)) < 0.8 * before


def test_compressed_only_trains_the_factors_and_eval_runs_each_epoch():
    teacher = _teacher()
    student = init_student(teacher, {role: 3 for role in _roles(teacher)})
    head = student.head.weight.detach().clone()
    bases = {k: b.weight.detach().clone() for k, b in crisp_bases(student).items()}
    report = distill_(student, teacher, _images(64), DistillConfig(epochs=2, batch_size=32, trainable="compressed"),
                      progress=False, eval_fn=lambda m: {"mse": _agreement_error(m, teacher, _images(8))})
    assert torch.equal(student.head.weight, head)
    assert any(not torch.equal(b.weight, bases[k]) for k, b in crisp_bases(student).items())
    assert len(report.epoch_evals) == 2 and "mse" in report.epoch_evals[0]


@pytest.mark.parametrize("kwargs, needle", [
    ({"epochs": -1}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"lr": 0}, "lr"),
    ({"lambda_kl": 0, "lambda_feat": 0}, "nothing to distil"), ({"trainable": "some"}, "trainable"),
])
def test_bad_distill_configs_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        DistillConfig(**kwargs)


def test_distill_refuses_mismatched_students_and_too_little_data():
    teacher = _teacher()
    with pytest.raises(ConfigError, match="same depth"):
        distill_(toy_timm_vit(depth=2), teacher, _images(8), progress=False)
    student = init_student(teacher, {role: 2 for role in _roles(teacher)})
    with pytest.raises(ConfigError, match="no full batch"):
        distill_(student, teacher, _images(8), DistillConfig(batch_size=64), progress=False)


def test_compress_vit_gives_a_checkpointable_crisp_model(tmp_path):
    teacher = toy_timm_vit()
    original = copy.deepcopy(teacher.state_dict())
    student, report = compress_vit(teacher, 0.5, _images(64), crisp_config=CONFIG,
                                   config=DistillConfig(epochs=1, batch_size=32), progress=False)
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items())  # argument untouched
    assert report.stored == budget(student).stored <= int(0.5 * report.original)
    assert report.distill.steps == 2 and "kept" in report.format()
    save_checkpoint(student, tmp_path / "small", extra={"compress": report.to_dict()})
    loaded = load_checkpoint(tmp_path / "small")
    x = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x))
    assert {k: b.r for k, b in crisp_bases(loaded).items()} == report.plan.group_ranks


def test_mimicry_only_skips_distillation():
    teacher = _teacher()
    student, report = compress_vit(teacher, 0.5, _images(32), init="svd", distill=False, progress=False)
    assert report.distill is None and report.init == "svd"
    same = init_student(teacher, report.plan)  # mimicry only = the data-free SVD init, untrained
    x = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(student(x), same(x))


def _fmnist_toy_checkpoint(tmp_path):
    """A tiny timm ViT that takes Fashion-MNIST images (28x28 grey), retrofitted and saved."""
    from crisp_edge.models.sources import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model({"library": "timm", "name": "vit_tiny_patch16_224", "kwargs": {
            "img_size": 28, "patch_size": 14, "in_chans": 1, "num_classes": 10, "embed_dim": 16, "depth": 2,
            "num_heads": 2, "mlp_ratio": 2.0}}).eval()
    retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2)), progress=False)
    return save_checkpoint(model, tmp_path / "teacher")


def test_cli_compress_writes_a_loadable_checkpoint(tmp_path, capsys):
    import argparse

    from crisp_edge.cli.compress import add_parser as add_compress_parser
    from crisp_edge.cli.compress import cmd_compress

    teacher = _fmnist_toy_checkpoint(tmp_path)
    parser = argparse.ArgumentParser()
    add_compress_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "small"
    args = parser.parse_args(["compress", str(teacher), "--keep", "0.5", "--out", str(out), "--fraction", "0.002",
                              "--epochs", "1", "--batch-size", "32", "--method", "greedy", "--eval",
                              "--eval-limit", "200", "--no-progress"])
    assert cmd_compress(args) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "compressed" in printed and "wrote" in printed
    model = load_checkpoint(out)
    meta = json.loads((out / "crisp.json").read_text())
    info = meta["extra"]["compress"]
    assert info["data"]["images"] == 120 and info["plan"]["method"] == "greedy"
    assert budget(model).stored == info["stored"] <= int(0.5 * info["original"])
    assert 0 <= info["eval"]["student_accuracy"] <= 1
    with pytest.raises(CheckpointError, match="already holds a checkpoint; pass --overwrite"):  # never silently
        cmd_compress(args)
    bad = parser.parse_args(["compress", str(tmp_path / "nope"), "--keep", "0.5", "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="neither a CRISP checkpoint"):
        cmd_compress(bad)


@pytest.mark.slow  # ONNX export + validation: ~5 s alone, far more on a busy machine
def test_compressed_student_adapts_and_exports(tmp_path):
    """The student is an ordinary CRISP model: adapt_ trains its mixers with the bases frozen, and the
    ONNX exporter validates it against PyTorch."""
    from crisp_edge.export import export_onnx

    from crisp_edge.training.adapt import AdaptConfig, adapt_
    from crisp_edge.training.loop import TrainConfig

    student, _ = compress_vit(_teacher(), 0.5, _images(64), config=DistillConfig(epochs=1, batch_size=32),
                              progress=False)
    bases = {k: b.weight.detach().clone() for k, b in crisp_bases(student).items()}
    x, y = _images(32, seed=4), torch.arange(32) % 3
    adapt_(student, x, y, num_classes=3, config=AdaptConfig(train=TrainConfig(epochs=1, batch_size=16)), progress=False)
    assert all(torch.equal(b.weight, bases[k]) for k, b in crisp_bases(student).items())
    bundle = export_onnx(student, tmp_path / "bundle", mode="dense", example_input=_images(2))
    assert (tmp_path / "bundle").is_dir() and bundle.manifest["parity"]["max_abs"] < 1e-3


def test_greedy_on_large_full_ranks_moves_on_a_bounded_grid():
    from crisp_edge.training.compress.ranks import MAX_GRID, _rank_grid

    assert _rank_grid(8) == list(range(1, 9))
    grid = _rank_grid(200)
    assert grid[0] == 1 and grid[-1] == 200 and len(grid) <= MAX_GRID + 2
    teacher = toy_timm_vit()
    retrofit_(teacher, CrispConfig(default=RoleConfig(s=32, group_size=4)), progress=False)  # full ranks 96-128
    plan = allocate_ranks(teacher, 0.4, "greedy", calib=_images(16))
    assert plan.stored <= plan.target and budget(init_student(teacher, plan)).stored == plan.stored
    assert all(plan.role_ranks[r] in _rank_grid(plan.full_ranks[r]) for r in plan.role_ranks)


def test_peak_rss_is_the_processs_own_not_its_parents():
    """``ru_maxrss`` survives fork + exec on Linux (a child of a large parent reports the parent's peak);
    ``peak_rss_mb`` must not, or every benchmark that measures memory in a fresh process is wrong."""
    import subprocess
    import sys

    from crisp_edge.training.compress.distill import peak_rss_mb

    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # touch every page: resident
    parent = peak_rss_mb()
    code = "import sys; sys.path[:0] = {!r}; from crisp_edge.training.compress.distill import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code.format(sys.path)], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert parent > 400 and child < parent - 300, (parent, child)
    del ballast
