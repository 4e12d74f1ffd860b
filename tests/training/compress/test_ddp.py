"""Distillation under DDP: 2 CPU processes on the gloo backend give the single-process result.

``distill_`` shards every global batch over the processes (``DistributedSampler``) and DDP averages
the gradients, so the optimisation steps are the same as one process taking the whole global batch;
only the order of floating-point sums differs.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from crisp_edge.errors import ConfigError
from crisp_edge.method.config import CrispConfig, RoleConfig
from crisp_edge.testing import toy_timm_vit
from crisp_edge.training.compress import DistillConfig, distill_, init_student
from crisp_edge.training.retrofit import retrofit_

CONFIG = DistillConfig(epochs=2, batch_size=16, lr=1e-3, seed=3)
WORLD = 2


def _setup():
    torch.set_num_threads(1)
    teacher = toy_timm_vit(seed=0)
    retrofit_(teacher, CrispConfig(default=RoleConfig(s=4, group_size=2)), progress=False)
    student = init_student(teacher, {"qkv": 3, "proj": 2, "fc1": 3, "fc2": 2})
    x = torch.randn(72, 1, 16, 16, generator=torch.Generator().manual_seed(5))  # 4 global batches + 8 dropped
    return teacher, student, x


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        teacher, student, x = _setup()
        with pytest.raises(ConfigError, match="divisible by the 2 processes"):  # checked before any step
            distill_(student, teacher, x, DistillConfig(batch_size=15), progress=False)
        report = distill_(student, teacher, x, CONFIG, progress=False)
        assert report.world_size == world and report.steps == 2 * 4
        state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
        save_file(state, f"{out}.rank{rank}.safetensors", metadata={"loss": repr(report.epoch_losses[-1])})
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "rendezvous"), str(tmp_path / "student")), nprocs=WORLD, join=True)
    teacher, single, x = _setup()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    report = distill_(single, teacher, x, CONFIG, progress=False)
    assert report.world_size == 1 and report.steps == 2 * 4
    ranks = [load_file(str(tmp_path / f"student.rank{r}.safetensors")) for r in range(WORLD)]
    moved = 0
    for name, value in single.state_dict().items():
        for r in ranks:  # every replica holds the same weights, and they are the single-process ones
            torch.testing.assert_close(r[name], value, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
        moved += not torch.equal(value, before[name])
    assert moved > 10  # training really changed the student
