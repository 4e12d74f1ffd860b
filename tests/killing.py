"""Kill harness shared by ``tests/test_kill.py`` and ``bench/reliability.py``.

A child process saves a checkpoint and a mixer file over and over, alternating between two known
versions A and B, and is killed with SIGKILL at a random moment. Afterwards each artifact must be
absent (only if no save of it had completed), or load and equal exactly the version last reported
complete or the one being written when the kill came: never a loadable half file, never a mix.
Leftover temporary files must be invisible to the loaders and removable.

The child is either forked from the test process (fast: the models are already in memory) or a fresh
interpreter (``python -m tests.killing``), which loads A and B from reference checkpoints.
"""
from __future__ import annotations

import copy
import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crisp_edge.errors import CrispEdgeError
from crisp_edge.files.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    save_checkpoint,
)
from crisp_edge.files.io import remove_stale_temp_files, temp_files
from crisp_edge.files.mixers import read_mixers, save_mixers, task_tensors

CKPT, MIXERS = "ckpt", "task.safetensors"
NAMES = ("A", "B")


def make_versions() -> dict[str, torch.nn.Module]:
    """Two CRISP toys of one architecture whose every tensor differs (B = A + seeded noise)."""
    from tests.fuzzing import crisp_toy

    a = crisp_toy()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return {"A": a, "B": b}


def save_loop(folder: Path, models: dict[str, torch.nn.Module], start: int, report) -> None:
    """Save forever, alternating versions; ``report(line)`` after each completed save."""
    i = start
    report("ready")
    while True:
        name = NAMES[i % 2]
        report(f"start {name}")
        save_checkpoint(models[name], folder / CKPT)
        report(f"ckpt {name}")
        save_mixers(models[name], folder / MIXERS, task=name)
        report(f"mixers {name}")
        i += 1


@dataclass
class KillReport:
    kills: int = 0
    states: dict[str, int] = field(default_factory=dict)  # "ckpt=A" / "mixers=absent" / ... -> count
    temp_files_seen: int = 0
    temp_files_removed: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"kills": self.kills, "states": dict(sorted(self.states.items())), "temp_files_seen": self.temp_files_seen,
                "temp_files_removed": self.temp_files_removed, "problems": self.problems[:20],
                "seconds": round(self.seconds, 1)}


def _equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def identify(folder: Path, models: dict[str, torch.nn.Module]) -> dict[str, str]:
    """What each artifact in ``folder`` holds: "A", "B", "absent", or a problem description."""
    out = {}
    ckpt = folder / CKPT
    if not (ckpt / META_FILE).exists():
        out["ckpt"] = "absent"
    else:
        try:
            state = load_checkpoint(ckpt).state_dict()
            out["ckpt"] = next((n for n, m in models.items() if _equal_state(state, m.state_dict())), "loads but is neither A nor B")
        except CrispEdgeError as e:
            out["ckpt"] = f"refused: {e}"
    if not (folder / MIXERS).exists():
        out["mixers"] = "absent"
    else:
        try:
            mf = read_mixers(folder / MIXERS)
            out["mixers"] = next((n for n, m in models.items() if mf.task == n and _equal_state(mf.tensors, task_tensors(m))),
                                 "loads but is neither A nor B")
        except CrispEdgeError as e:
            out["mixers"] = f"refused: {e}"
    return out


class Tracker:
    """Which versions each artifact may hold, from the child's reports: the last completed save, plus
    any save that was in flight when a child was killed (it may have completed unreported)."""

    def __init__(self) -> None:
        self.possible = {"ckpt": {"absent"}, "mixers": {"absent"}}
        self.inflight: dict[str, str | None] = {"ckpt": None, "mixers": None}

    def feed(self, lines: list[str]) -> None:
        for line in lines:
            word, _, name = line.partition(" ")
            if word == "start":
                self.inflight["ckpt"] = name
            elif word in ("ckpt", "mixers"):
                self.possible[word] = {name}
                self.inflight[word] = None
                if word == "ckpt":
                    self.inflight["mixers"] = name

    def killed(self) -> None:
        for artifact, name in self.inflight.items():
            if name is not None:
                self.possible[artifact].add(name)
            self.inflight[artifact] = None

    def observed(self, artifact: str, state: str) -> None:
        self.possible[artifact] = {state}


def check_after_kill(folder: Path, models: dict[str, torch.nn.Module], tracker: Tracker, report: KillReport) -> None:
    found = identify(folder, models)
    for artifact, state in found.items():
        key = f"{artifact}={state if state in ('A', 'B', 'absent') else 'BAD'}"
        report.states[key] = report.states.get(key, 0) + 1
        if state not in tracker.possible[artifact]:
            report.problems.append(f"kill {report.kills}: {artifact} is {state!r}, allowed {sorted(tracker.possible[artifact])}")
        else:
            tracker.observed(artifact, state)
    leftovers = temp_files(folder) + (temp_files(folder / CKPT) if (folder / CKPT).exists() else [])
    report.temp_files_seen += len(leftovers)
    visible = sorted(p.name for p in folder.glob("*.safetensors")) + (
        sorted(p.name for p in (folder / CKPT).iterdir()) if (folder / CKPT).exists() else [])
    stray = [n for n in visible if n not in (MIXERS, META_FILE, WEIGHTS_FILE) and not n.startswith(".")]
    if stray:
        report.problems.append(f"kill {report.kills}: files a loader or a glob would pick up: {stray}")


def _read_lines(fd: int, timeout: float) -> list[str]:
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


def _wait_ready(fd: int, timeout: float) -> list[str]:
    data = b""
    end = time.monotonic() + timeout
    while b"ready\n" not in data and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    if b"ready\n" not in data:
        raise RuntimeError(f"kill-test child never became ready: {data[-500:]!r}")
    return data.decode().splitlines()


def kill_forked(loop, delay: float) -> list[str]:
    """Fork a child running ``loop(report)`` (``report(line)`` sends a line to the parent; the loop says
    "ready" first), SIGKILL it ``delay`` seconds after it is ready; returns every line it sent."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the test runner
        try:
            os.close(r)
            signal.setitimer(signal.ITIMER_REAL, 0)
            loop(lambda line: os.write(w, (line + "\n").encode()))
        finally:
            os._exit(1)
    os.close(w)
    try:
        lines = _wait_ready(r, 60)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return lines + _read_lines(r, 1.0)
    finally:
        os.close(r)


def kill_once_forked(folder: Path, models: dict[str, torch.nn.Module], delay: float, start: int) -> list[str]:
    """A forked child running ``save_loop``, SIGKILLed ``delay`` seconds after it is ready; returns its reports."""
    return kill_forked(lambda report: save_loop(folder, models, start, report), delay)


def kill_once_spawned(folder: Path, refs: Path, delay: float, start: int) -> list[str]:
    """Like ``kill_once_forked`` with a fresh interpreter (``python -m tests.killing``)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "tests.killing", str(folder), str(refs), str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=root, env=env)
    try:
        fd = proc.stdout.fileno()
        lines = _wait_ready(fd, 300)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        return lines + _read_lines(fd, 1.0)
    finally:
        proc.kill()
        proc.stdout.close()


def run_kills(folder: Path, n: int, seed: int, spawn: bool = False, max_delay: float = 0.25) -> KillReport:
    """``n`` kill cycles on one folder (each child replaces what the previous one left)."""
    rng = random.Random(seed)
    models = make_versions()
    report = KillReport()
    refs = folder / "refs"
    if spawn:
        for name, m in models.items():
            save_checkpoint(m, refs / name)
        models = {name: load_checkpoint(refs / name) for name in NAMES}
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tracker = Tracker()
    for i in range(n):
        # the first delays are tiny, so some kills land in the very first save (nothing complete yet)
        delay = rng.uniform(0, 0.01) if i < 3 else rng.uniform(0, max_delay)
        lines = (kill_once_spawned(work, refs, delay, rng.randrange(2)) if spawn
                 else kill_once_forked(work, models, delay, rng.randrange(2)))
        tracker.feed([l for l in lines if l != "ready"])
        tracker.killed()
        report.kills += 1
        check_after_kill(work, models, tracker, report)
    report.temp_files_removed = len(remove_stale_temp_files(work, min_age_s=0)) + (
        len(remove_stale_temp_files(work / CKPT, min_age_s=0)) if (work / CKPT).exists() else 0)
    if temp_files(work) or ((work / CKPT).exists() and temp_files(work / CKPT)):
        report.problems.append("temporary files remain after remove_stale_temp_files")
    report.seconds = time.perf_counter() - start
    return report


if __name__ == "__main__":  # the spawned child: python -m tests.killing <folder> <refs> <start>
    torch.set_num_threads(1)
    _folder, _refs, _start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    _models = {name: load_checkpoint(_refs / name) for name in NAMES}
    save_loop(_folder, _models, _start, lambda line: (sys.stdout.write(line + "\n"), sys.stdout.flush()))
