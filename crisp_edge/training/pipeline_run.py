"""The run folder of ``run_pipeline`` (Alg. 6): its state file, resuming a run with the same settings,
and ``--restart`` that keeps the earlier run's own files aside until the new run completes (and puts
them back if it fails); files the pipeline did not write are never touched."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


from crisp_edge.errors import CrispEdgeError
from crisp_edge.files.checkpoint import read_checkpoint_meta
from crisp_edge.files.io import atomic_write_json, check_envelope, read_json
from crisp_edge.files.mixers import read_mixers

PIPELINE_FORMAT = "crisp-edge/pipeline"
PIPELINE_VERSION = 1
STATE_FILE = "pipeline.json"
STAGES = ("retrofit", "compress", "adapt")
#: Where ``--restart`` keeps the earlier run until the new one completes.
PREVIOUS_RUN = ".crisp-edge-previous-run"


class PipelineError(CrispEdgeError, RuntimeError):
    """A pipeline run folder that cannot be resumed as asked."""



def _diff(old: Any, new: Any, path: str = "") -> str | None:
    """The first setting (dotted path) where two config dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _diff(old.get(k), new.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if old == new else f"{path}: {old!r} then, {new!r} now"


def _own_artifacts(folder: Path, state: dict) -> list[str]:
    """What a run recorded in ``state`` wrote in ``folder`` (relative names; ``pipeline.json`` last)."""
    names = [d for d in ("retrofit", "compressed") if (folder / d).exists()]
    tasks = (state.get("stages", {}).get("adapt") or {}).get("tasks", {})
    names += [r["file"] for r in tasks.values() if isinstance(r, dict) and isinstance(r.get("file"), str)
              and r["file"].startswith("tasks/") and (folder / r["file"]).exists()]
    return names + [STATE_FILE]


def _move(names: list[str], src: Path, dst: Path) -> None:
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        if (dst / name).is_dir():
            shutil.rmtree(dst / name)
        (src / name).rename(dst / name)


class _Run:
    """The run folder's state file: read, check against the settings, record stages atomically.

    ``restart`` never deletes the earlier run before a new one has completed: its own artifacts (the
    stage folders, the mixer files it recorded, ``pipeline.json``; nothing else in the folder) move
    into ``PREVIOUS_RUN``, come back if the new run fails (``restore``), and are deleted once it
    completes (``commit``). A run killed after a restart keeps them until some later run completes."""

    def __init__(self, folder: Path, config: Any, restart: bool) -> None:
        self.folder, self.path = folder, folder / STATE_FILE
        self.previous = folder / PREVIOUS_RUN
        settings = config.to_dict()
        if restart and self.path.exists():
            current = read_json(self.path, PipelineError, "pipeline state")
            if (self.previous / STATE_FILE).exists():  # an unfinished restart: what is here is its own partial run
                for name in _own_artifacts(folder, current):
                    p = folder / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            else:  # (a move cut short by a kill goes on: pipeline.json moves last)
                self.previous.mkdir(exist_ok=True)
                _move(_own_artifacts(folder, current), folder, self.previous)
        self.restarted = self.previous.exists()
        self.restore_on_failure = restart and self.restarted
        folder.mkdir(parents=True, exist_ok=True)
        self.state = {"format": PIPELINE_FORMAT, "version": PIPELINE_VERSION, "config": settings, "stages": {}}
        if self.path.exists():
            old = read_json(self.path, PipelineError, "pipeline state")
            check_envelope(old, fmt=PIPELINE_FORMAT, max_version=PIPELINE_VERSION,
                           fields={"config": dict, "stages": dict}, error=PipelineError, where=str(self.path),
                           what="pipeline state")
            diff = _diff(old["config"], settings)
            if diff:
                raise PipelineError(f"{folder} holds a pipeline run with other settings ({diff}); use another "
                                    "folder, or restart=True (--restart) to start this one over.")
            self.state["stages"] = old["stages"]
        elif not self.restarted and any(folder.iterdir()):
            raise PipelineError(f"{folder} is not empty and holds no {STATE_FILE}; give the pipeline an empty or new folder.")

    def commit(self) -> None:
        """The new run completed: the previous run's artifacts (after a restart) go."""
        if self.restarted:
            shutil.rmtree(self.previous)

    def restore(self) -> None:
        """The new run failed: remove what it wrote and put the previous run back."""
        if not self.restore_on_failure:
            return
        for name in _own_artifacts(self.folder, self.state):
            p = self.folder / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        old = read_json(self.previous / STATE_FILE, PipelineError, "pipeline state")
        _move(_own_artifacts(self.previous, old), self.previous, self.folder)
        shutil.rmtree(self.previous)

    def done(self, stage: str) -> dict | None:
        return self.state["stages"].get(stage)

    def record(self, stage: str, report: dict) -> None:
        self.state["stages"][stage] = report
        atomic_write_json(self.path, self.state)


def _checkpoint_ok(path: Path) -> bool:
    try:
        read_checkpoint_meta(path)
        return True
    except CrispEdgeError:
        return False


def _mixer_ok(path: Path) -> bool:
    try:
        read_mixers(path)
        return True
    except CrispEdgeError:
        return False
