"""The joint pipeline (Alg. 6): stages, artifacts, resume, refusal of a folder with other settings."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from crisp_edge.errors import ConfigError
from crisp_edge.files.checkpoint import load_checkpoint
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.models.sources import load_embedded_vit
from crisp_edge.training.adapt import AdaptConfig
from crisp_edge.training.loop import TrainConfig
from crisp_edge.training.pipeline_run import PREVIOUS_RUN
from crisp_edge.training.pipeline import (
    STATE_FILE,
    PipelineConfig,
    PipelineError,
    run_pipeline,
)

FAST = dict(tasks=("digits",), train_limit=64, adapt=AdaptConfig(train=TrainConfig(epochs=1, batch_size=32)))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28)
    return (x, torch.zeros(128, dtype=torch.long)), (x[:16], torch.zeros(16, dtype=torch.long))


def _run(tmp, data, **kw):
    distill, evaluation = data
    return run_pipeline(load_embedded_vit(), tmp, PipelineConfig(**{**FAST, **kw}), distill_data=distill,
                        eval_data=evaluation, progress=False, log=lambda _: None)


def test_without_compression_adapts_the_retrofit_model(tmp_path, data):
    res = _run(tmp_path / "run", data, keep_fraction=None)
    assert res.checkpoint == tmp_path / "run" / "retrofit"
    model = load_checkpoint(res.checkpoint)
    mf = read_mixers(res.mixer_files["digits"])
    assert mf.meta["bases_sha256"] == bases_fingerprint(model)  # the task is bound to the deployable bases
    apply_mixers_(model, mf)
    state = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    assert set(state["stages"]) == {"retrofit", "compress", "adapt"} and state["stages"]["compress"] == {"skipped": True}
    assert res.stages["adapt"]["tasks"]["digits"]["bases_unchanged"] is True


def test_compression_then_adaptation_and_resume(tmp_path, data):
    folder = tmp_path / "run"
    res = _run(folder, data, keep_fraction=0.5, distill_epochs=1, distill_fraction=1.0)
    c = res.stages["compress"]
    assert res.checkpoint == folder / "compressed"
    assert c["kept_fraction"] <= 0.5 and c["stored"] < res.stages["retrofit"]["stored"] * 0.5 + 1
    student = load_checkpoint(res.checkpoint)
    assert read_mixers(res.mixer_files["digits"]).meta["bases_sha256"] == bases_fingerprint(student)
    before = {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE}
    again = _run(folder, data, keep_fraction=0.5, distill_epochs=1, distill_fraction=1.0)
    assert again.resumed == ["retrofit", "compress", "adapt digits"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE} == before
    assert again.stages == res.stages


def test_resume_redoes_a_stage_whose_files_are_damaged(tmp_path, data):
    folder = tmp_path / "run"
    _run(folder, data, keep_fraction=None)
    mixer = folder / "tasks" / "digits.mixers.safetensors"
    mixer.write_bytes(mixer.read_bytes()[:100])  # truncated: not trusted, trained again
    again = _run(folder, data, keep_fraction=None)
    assert again.resumed == ["retrofit"]
    read_mixers(mixer)


def test_other_settings_in_the_same_folder_are_refused(tmp_path, data):
    folder = tmp_path / "run"
    _run(folder, data, keep_fraction=None)
    with pytest.raises(PipelineError, match=r"train_limit: 64 then, 32 now.*restart"):
        _run(folder, data, keep_fraction=None, train_limit=32)
    res = run_pipeline(load_embedded_vit(), folder, PipelineConfig(**{**FAST, "keep_fraction": None, "train_limit": 32}),
                       distill_data=data[0], eval_data=data[1], restart=True, progress=False, log=lambda _: None)
    assert res.resumed == []


def test_a_non_empty_folder_without_a_run_is_refused(tmp_path, data):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not empty"):
        _run(tmp_path, data, keep_fraction=None)
    with pytest.raises(PipelineError, match="not empty"):  # restart never deletes what is not a run
        run_pipeline(load_embedded_vit(), tmp_path, PipelineConfig(**{**FAST, "keep_fraction": None}),
                     distill_data=data[0], eval_data=data[1], restart=True, progress=False, log=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kw, message", [
    (dict(keep_fraction=1.5), "keep_fraction"), (dict(allocator="best"), "allocator"),
    (dict(tasks=("imagenet",)), "tasks"), (dict(tasks="mnist"), "tuple of task names"),
    (dict(distill_epochs=0), "distill_epochs"), (dict(train_limit=0), "train_limit"),
])
def test_bad_settings_are_clear_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        replace(PipelineConfig(), **kw)


def test_restart_keeps_the_old_run_until_the_new_one_completes(tmp_path, data, monkeypatch):
    """--restart on a run folder: files the pipeline did not write stay; when the new run fails the old
    run is put back whole; when it completes the old run's files are gone."""
    import crisp_edge.training.pipeline as pipeline

    folder = tmp_path / "run"
    _run(folder, data, keep_fraction=None)
    (folder / "notes.txt").write_text("mine")
    old = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def broken(*a, **k):
        raise RuntimeError("the new run fails in its first stage")

    monkeypatch.setattr(pipeline, "retrofit_", broken)
    with pytest.raises(RuntimeError, match="first stage"):
        run_pipeline(load_embedded_vit(), folder, PipelineConfig(**{**FAST, "keep_fraction": None, "train_limit": 32}),
                     distill_data=data[0], eval_data=data[1], restart=True, progress=False, log=lambda _: None)
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == old
    monkeypatch.undo()
    res = run_pipeline(load_embedded_vit(), folder, PipelineConfig(**{**FAST, "keep_fraction": None, "train_limit": 32}),
                       distill_data=data[0], eval_data=data[1], restart=True, progress=False, log=lambda _: None)
    assert res.resumed == [] and (folder / "notes.txt").read_text() == "mine"
    assert not (folder / PREVIOUS_RUN).exists()
    assert json.loads((folder / STATE_FILE).read_text())["config"]["train_limit"] == 32
