"""Kill tests: a process SIGKILLed at random moments while it saves checkpoints and mixer files leaves
each artifact absent (never saved yet) or loadable and exactly one of the versions it was writing,
never a half file; its leftover temporary files are invisible to the loaders and removable."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from crisp_edge import load_checkpoint, save_checkpoint
from crisp_edge.files.checkpoint import META_FILE, WEIGHTS_FILE
from crisp_edge.files.io import (
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temp_files,
    temp_files,
)
from crisp_edge.files.mixers import read_mixers, save_mixers
from tests import killing


@pytest.mark.timeout(600)
def test_fifty_kills_of_a_forked_saver(tmp_path):
    report = killing.run_kills(tmp_path, n=50, seed=0, max_delay=0.15)
    assert not report.problems, report.to_dict()
    assert report.kills == 50
    states = report.states
    assert states.get("ckpt=A", 0) + states.get("ckpt=B", 0) >= 40, states  # most kills land after a first save
    assert not temp_files(tmp_path / "work") and not temp_files(tmp_path / "work" / killing.CKPT)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fifty_kills_of_a_fresh_interpreter(tmp_path):
    report = killing.run_kills(tmp_path, n=50, seed=1, spawn=True, max_delay=0.5)
    assert not report.problems, report.to_dict()


def test_the_kill_test_catches_a_checkpoint_written_file_by_file(tmp_path, monkeypatch):
    """The harness has teeth: with the old writer (weights, then crisp.json, each atomic on its own) a
    kill between the two renames leaves new weights under old metadata, which refuse to load."""
    import crisp_edge.files.checkpoint as ckpt

    def file_by_file(folder, data, meta):
        atomic_write_bytes(folder / WEIGHTS_FILE, data)
        atomic_write_json(folder / META_FILE, meta)

    monkeypatch.setattr(ckpt, "_write_folder", file_by_file)
    for seed in range(20):
        report = killing.run_kills(tmp_path / str(seed), n=5, seed=seed)
        if report.problems:
            assert "refused" in report.problems[0] and "SHA-256" in report.problems[0]
            return
    pytest.fail("100 kills of a non-atomic checkpoint writer went unnoticed")


@pytest.mark.parametrize("crash_before", range(6))
def test_a_crash_at_any_step_of_a_checkpoint_save_leaves_a_loadable_one(tmp_path, monkeypatch, crash_before):
    """Deterministic companion of the kill tests: interrupt ``save_checkpoint`` before each of its
    file-system steps (write staged weights, switch crisp.json, link, switch back, clean up)."""
    import crisp_edge.files.checkpoint as ckpt

    versions = killing.make_versions()
    folder = save_checkpoint(versions["A"], tmp_path / "c")
    calls = [0]

    def step(fn):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] > crash_before:
                raise KeyboardInterrupt("crash")
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ckpt, "atomic_write_bytes", step(atomic_write_bytes))
    monkeypatch.setattr(ckpt, "atomic_write_json", step(atomic_write_json))
    monkeypatch.setattr(ckpt.os, "link", step(os.link))
    try:
        save_checkpoint(versions["B"], folder)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    state = load_checkpoint(folder).state_dict()
    matches = [n for n, m in versions.items() if all(torch.equal(state[k], v) for k, v in m.state_dict().items())]
    assert matches == (["B"] if crash_before >= 2 else ["A"])  # B is in place once crisp.json switched (step 2)
    save_checkpoint(versions["B"], folder)  # the next save tidies up whatever the crash left
    assert sorted(p.name for p in folder.iterdir()) == [META_FILE, WEIGHTS_FILE]


def test_loaders_ignore_leftover_temporary_files(tmp_path):
    model = killing.make_versions()["A"]
    folder = save_checkpoint(model, tmp_path / "c")
    mixers = save_mixers(model, tmp_path / "task.safetensors", task="A")
    junk = {folder / f".{META_FILE}.x1.tmp": b'{"format": "crisp-edge/checkpoint", "version": 1',
            folder / f".{WEIGHTS_FILE}.x2.tmp": b"half a file",
            folder / f".{WEIGHTS_FILE}.0123456789abcdef.staged": b"\0" * 9,
            tmp_path / ".task.safetensors.x3.tmp": mixers.read_bytes()[:100]}
    for path, data in junk.items():
        path.write_bytes(data)
    assert torch.equal(load_checkpoint(folder).head.weight, model.head.weight)
    assert read_mixers(mixers).task == "A"
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["task.safetensors"]  # a glob does not see them
    assert json.loads((folder / META_FILE).read_text())["weights"]["file"] == WEIGHTS_FILE
    assert set(temp_files(folder)) == {folder / f".{META_FILE}.x1.tmp", folder / f".{WEIGHTS_FILE}.x2.tmp"}
    assert temp_files(folder, WEIGHTS_FILE) == [folder / f".{WEIGHTS_FILE}.x2.tmp"]
    assert remove_stale_temp_files(folder) == []  # fresh: may belong to a write in progress
    old = time.time() - 3600
    for p in temp_files(folder):
        os.utime(p, (old, old))
    assert len(remove_stale_temp_files(folder)) == 2 and temp_files(folder) == []
    assert len(remove_stale_temp_files(tmp_path, min_age_s=0)) == 1
    save_checkpoint(model, folder)  # removes the staged leftover
    assert sorted(p.name for p in folder.iterdir()) == [META_FILE, WEIGHTS_FILE]


@pytest.mark.timeout(600)
def test_thirty_kills_of_a_bundle_replacement(tmp_path):
    """A process killed at random moments while it replaces a bundle folder again and again leaves a
    complete bundle (the old one or the new) at the path after the first completed write, never no
    bundle or a mix; the next export's cleanup leaves no hidden leftover beside it."""
    from tests import killing_bundles

    report = killing_bundles.run_swap_kills(tmp_path, n=30, seed=0)
    assert not report.problems, report.to_dict()
    assert report.kills == 30
    assert report.states.get("A", 0) + report.states.get("B", 0) >= 25, report.states
    assert report.leftovers_cleaned > 0, report.to_dict()  # kills landed mid-write, and their leftovers went
