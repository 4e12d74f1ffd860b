"""Resumable long runs: adaptation (``train_classifier``) and the descent retrofits, stopped or killed
part-way and resumed, end bit-identical to uninterrupted runs; foreign or damaged states are refused."""
from __future__ import annotations

import os
import random
import signal
import time
from functools import lru_cache

import pytest
import torch

from crisp_edge import CrispConfig, RoleConfig, retrofit_
from crisp_edge.errors import CheckpointError, ConfigError
from crisp_edge.files.run_state import RUN_STATE_FILE
from crisp_edge.training.adapt import AdaptConfig, adapt_
from crisp_edge.training.loop import TrainConfig
from tests.conftest import fresh_toy
from tests.files.test_mixers import crisp_toy
from tests.training.test_adapt import toy_task

CONFIG = AdaptConfig(train=TrainConfig(epochs=3, batch_size=16, warmup_fraction=0.2))  # 8 steps per epoch, 24 in all
RETROFIT = CrispConfig(default=RoleConfig(s=4, group_size=2, r=6))


class Stop(Exception):
    """Stands in for a crash: raised inside the run at a chosen step."""


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def task():
    return toy_task(), toy_task(seed=1)


@pytest.fixture(scope="module")
def uninterrupted(task):
    (x, y), evaluation = task
    model = crisp_toy()
    report = adapt_(model, x, y, num_classes=3, config=CONFIG, eval_data=evaluation, progress=False)
    return model, report


def last_save(done: int, every: int | None, period: int, within: bool) -> int:
    """The step of the last state saved once ``done`` steps completed. Saves come at the end of each
    ``period`` (an epoch, a group) and every ``every`` steps: counted from the start of the run, or
    ``within`` each period (the retrofit's descent steps are per group)."""
    return max(k for k in range(done + 1)
               if k % period == 0 or (every and ((k % period) if within else k) % every == 0))


def count_forwards(model: torch.nn.Module, stop_at: int | None = None) -> list[int]:
    """Count training forward passes; with ``stop_at``, the ``stop_at``-th raises ``Stop``."""
    forward, calls = model.forward, [0]

    def counted(*args, **kwargs):
        if model.training:
            calls[0] += 1
            if calls[0] == stop_at:
                raise Stop()
        return forward(*args, **kwargs)

    model.forward = counted
    return calls


@pytest.mark.parametrize("stop_at, every", [(3, 2), (8, 4), (9, None), (20, 5), (24, 7)])
def test_adapt_resumes_bit_identically(task, uninterrupted, tmp_path, stop_at, every):
    (x, y), evaluation = task
    model = crisp_toy()
    count_forwards(model, stop_at)
    with pytest.raises(Stop):
        adapt_(model, x, y, num_classes=3, config=CONFIG, eval_data=evaluation, progress=False,
               checkpoint_dir=tmp_path, checkpoint_every=every)
    resumed = crisp_toy()  # a fresh start from the same model, as after a crash
    calls = count_forwards(resumed)
    report = adapt_(resumed, x, y, num_classes=3, config=CONFIG, eval_data=evaluation, progress=False,
                    checkpoint_dir=tmp_path, checkpoint_every=every, resume=True)
    assert calls[0] == 24 - last_save(stop_at - 1, every, 8, within=False)  # it did resume, from the last state saved
    ref_model, ref_report = uninterrupted
    assert states_equal(resumed, ref_model)
    assert report.history.epochs == ref_report.history.epochs
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_STATE_FILE]


def test_resume_without_a_state_starts_afresh_and_a_finished_run_returns(task, uninterrupted, tmp_path):
    (x, y), evaluation = task
    first = crisp_toy()
    adapt_(first, x, y, num_classes=3, config=CONFIG, eval_data=evaluation, progress=False, checkpoint_dir=tmp_path,
           resume=True)
    assert states_equal(first, uninterrupted[0])
    again = crisp_toy()
    start = time.perf_counter()
    report = adapt_(again, x, y, num_classes=3, config=CONFIG, eval_data=evaluation, progress=False,
                    checkpoint_dir=tmp_path, resume=True)  # already complete: restores, trains nothing
    assert states_equal(again, uninterrupted[0]) and report.history.epochs == uninterrupted[1].history.epochs
    assert time.perf_counter() - start < 5


def test_killed_adaptation_resumes_bit_identically(task, uninterrupted, tmp_path):
    """A forked child adapts with checkpoints and is SIGKILLed at a random moment; the parent resumes."""
    (x, y), evaluation = task
    rng = random.Random(0)
    for attempt in range(3):
        folder = tmp_path / str(attempt)
        pid = os.fork()
        if pid == 0:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                adapt_(crisp_toy(), x, y, num_classes=3, config=CONFIG, eval_data=evaluation, progress=False,
                       checkpoint_dir=folder, checkpoint_every=3)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 60
        while not (folder / RUN_STATE_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        resumed = crisp_toy()
        calls = count_forwards(resumed)
        report = adapt_(resumed, x, y, num_classes=3, config=CONFIG, eval_data=evaluation, progress=False,
                        checkpoint_dir=folder, checkpoint_every=3, resume=True)
        assert calls[0] < 24 and calls[0] % 3 == 0 or calls[0] in (16, 8)  # resumed from a saved step
        assert states_equal(resumed, uninterrupted[0])
        assert report.history.epochs == uninterrupted[1].history.epochs


def test_a_state_from_another_run_is_refused(task, tmp_path):
    (x, y), _ = task
    adapt_(crisp_toy(), x, y, num_classes=3, config=CONFIG, progress=False, checkpoint_dir=tmp_path)
    other = AdaptConfig(train=TrainConfig(epochs=3, batch_size=16, warmup_fraction=0.2, seed=1))
    with pytest.raises(CheckpointError, match=r"written by another run \(config differ\)"):
        adapt_(crisp_toy(), x, y, num_classes=3, config=other, progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match=r"written by another run \(data differ\)"):
        adapt_(crisp_toy(), x[:64], y[:64], num_classes=3, config=CONFIG, progress=False, checkpoint_dir=tmp_path,
               resume=True)
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 3
    with pytest.raises(CheckpointError, match=r"written by another run \(data differ\)"):
        adapt_(crisp_toy(), x, y2, num_classes=3, config=CONFIG, progress=False, checkpoint_dir=tmp_path, resume=True)
    other_bases = crisp_toy(seed=1)  # another pretrained model: same shapes, other frozen weights
    with pytest.raises(CheckpointError, match=r"written by another run \(frozen differ\)"):
        adapt_(other_bases, x, y, num_classes=3, config=CONFIG, progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="holds the state of a 'train' run, not of a 'retrofit' run"):
        retrofit_(fresh_toy("timm-vit"), RETROFIT, method="gradient", steps=5, progress=False, checkpoint_dir=tmp_path,
                  resume=True)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"\0" * 8 + b[8:], lambda b: b""])
def test_a_damaged_state_is_refused(task, tmp_path, damage):
    (x, y), _ = task
    adapt_(crisp_toy(), x, y, num_classes=3, config=CONFIG, progress=False, checkpoint_dir=tmp_path)
    path = tmp_path / RUN_STATE_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="delete it to start over|run state"):
        adapt_(crisp_toy(), x, y, num_classes=3, config=CONFIG, progress=False, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(checkpoint_every=0, checkpoint_dir="d"), "checkpoint_every must be a positive number"),
    (dict(checkpoint_every=2.5, checkpoint_dir="d"), "checkpoint_every must be a positive number"),
    (dict(checkpoint_every=5), "need checkpoint_dir="),
    (dict(resume=True), "need checkpoint_dir="),
    (dict(resume="yes", checkpoint_dir="d"), "resume must be True or False"),
])
def test_checkpoint_arguments_are_checked(task, kwargs, message):
    (x, y), _ = task
    model = crisp_toy()
    head = model.head
    with pytest.raises(ConfigError, match=message):
        adapt_(model, x, y, num_classes=3, config=CONFIG, progress=False, **kwargs)
    assert model.head is head  # refused before the model changed
    with pytest.raises(ConfigError, match=message):
        retrofit_(fresh_toy("timm-vit"), RETROFIT, method="gradient", steps=5, progress=False, **kwargs)


# --- retrofit ---------------------------------------------------------------------------------------------
RETROFIT_RUNS = {"gradient": dict(method="gradient", steps=12), "refine": dict(method="svd", refine_steps=12)}


def count_adam_steps(monkeypatch, stop_at: int | None = None) -> list[int]:
    step, calls = torch.optim.Adam.step, [0]

    def counted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_at:
            raise Stop()
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    return calls


@lru_cache(maxsize=None)
def uninterrupted_retrofit(run: str):
    model = fresh_toy("timm-vit")
    return model, retrofit_(model, RETROFIT, progress=False, **RETROFIT_RUNS[run])


@pytest.mark.parametrize("run", RETROFIT_RUNS)
@pytest.mark.parametrize("stop_at, every", [(5, 4), (12, 4), (13, 4), (30, 5), (70, None)])  # 8 groups x 12 steps
def test_retrofit_resumes_bit_identically(monkeypatch, tmp_path, run, stop_at, every):
    reference, ref_report = uninterrupted_retrofit(run)
    count_adam_steps(monkeypatch, stop_at)
    with pytest.raises(Stop):
        retrofit_(fresh_toy("timm-vit"), RETROFIT, progress=False, checkpoint_dir=tmp_path, checkpoint_every=every,
                  **RETROFIT_RUNS[run])
    monkeypatch.undo()
    resumed = fresh_toy("timm-vit")
    calls = count_adam_steps(monkeypatch)
    report = retrofit_(resumed, RETROFIT, progress=False, checkpoint_dir=tmp_path, checkpoint_every=every, resume=True,
                       **RETROFIT_RUNS[run])
    assert calls[0] == 96 - last_save(stop_at - 1, every, 12, within=True)  # it did resume, from the last state saved
    assert states_equal(resumed, reference)
    assert [l.rel_error for l in report.layers] == [l.rel_error for l in ref_report.layers]


def test_retrofit_resumes_only_on_the_same_weights(tmp_path):
    retrofit_(fresh_toy("timm-vit"), RETROFIT, method="gradient", steps=3, progress=False, checkpoint_dir=tmp_path)
    other = fresh_toy("timm-vit")
    with torch.no_grad():
        other.blocks[0].mlp.fc1.weight[0, 0] += 1
    with pytest.raises(CheckpointError, match=r"another run \(weights_sha256 differ\)"):
        retrofit_(other, RETROFIT, method="gradient", steps=3, progress=False, checkpoint_dir=tmp_path, resume=True)
