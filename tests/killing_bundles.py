"""Kill harness for bundle replacement (``write_validated`` + ``swap_folder``), shared by
``tests/files/test_kill.py`` and ``bench/reliability.py``.

A forked child replaces one bundle folder over and over, alternating between two versions A and B
(each a manifest naming its version plus a few files, one of them large enough to take a moment to
write), and is SIGKILLed at a random moment. Afterwards the bundle must be present (once a first
write completed) and hold exactly one complete version: every file of A, or every file of B, never
none and never a mix. Then the next run's cleanup (``clean_folder_leftovers``) must leave no
``.NAME.*`` leftover behind and the bundle in place.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from crisp_edge.export.bundle import MANIFEST
from crisp_edge.export.writing import is_bundle_of, write_validated
from crisp_edge.files.transaction import clean_folder_leftovers
from tests.killing import kill_forked

BUNDLE = "bundle"
NAMES = ("A", "B")
FILES = {"model.onnx": 4 << 20, "reference.npz": 4096, "tasks/t1.onnx_adapter": 1024}


def _content(version: str, name: str, size: int) -> bytes:
    return (f"{version}:{name}:".encode() * (size // 8 + 1))[:size]


def write_version(folder: Path, version: str) -> dict:
    for name, size in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_content(version, name, size))
    manifest = {"format": "crisp-edge/onnx-bundle", "version": 1, "test_version": version}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def identify(folder: Path) -> str:
    """"A", "B", "absent", or a description of what is wrong."""
    if not folder.exists():
        return "absent"
    try:
        version = json.loads((folder / MANIFEST).read_text())["test_version"]
    except (OSError, ValueError, KeyError) as e:
        return f"no readable manifest ({type(e).__name__})"
    for name, size in FILES.items():
        try:
            if (folder / name).read_bytes() != _content(version, name, size):
                return f"{name} is not version {version}'s"
        except OSError:
            return f"{name} is missing"
    return version


def swap_loop(parent: Path, start: int, report) -> None:
    i = start
    report("ready")
    while True:
        name = NAMES[i % 2]
        report(f"start {name}")
        write_validated(parent / BUNDLE, lambda f, v=name: write_version(f, v), lambda f, m: m)
        report(f"done {name}")
        i += 1


def kill_once(parent: Path, delay: float, start: int) -> list[str]:
    """A forked child running ``swap_loop``, SIGKILLed ``delay`` seconds after it is ready; returns its reports."""
    return kill_forked(lambda report: swap_loop(parent, start, report), delay)


@dataclass
class SwapKillReport:
    kills: int = 0
    states: dict[str, int] = field(default_factory=dict)
    leftovers_cleaned: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"kills": self.kills, "states": dict(sorted(self.states.items())),
                "leftovers_cleaned": self.leftovers_cleaned, "problems": self.problems[:20],
                "seconds": round(self.seconds, 1)}


def run_swap_kills(folder: Path, n: int, seed: int, max_delay: float = 0.3) -> SwapKillReport:
    """``n`` kill cycles of a child replacing ``folder/bundle``; each next cycle first runs the cleanup
    an export runs, as the next export would."""
    rng = random.Random(seed)
    report = SwapKillReport()
    folder.mkdir(parents=True, exist_ok=True)
    possible = {"absent"}
    start = time.perf_counter()
    for i in range(n):
        delay = rng.uniform(0, 0.01) if i < 2 else rng.uniform(0, max_delay)
        lines = kill_once(folder, delay, rng.randrange(2))
        inflight = None
        for line in lines:
            word, _, name = line.partition(" ")
            if word == "start":
                inflight = name
            elif word == "done":
                possible, inflight = {name}, None
        if inflight is not None:
            possible = possible | {inflight}
        report.kills += 1
        state = identify(folder / BUNDLE)
        key = state if state in ("A", "B", "absent") else "BAD"
        report.states[key] = report.states.get(key, 0) + 1
        if state not in possible:
            report.problems.append(f"kill {i}: the bundle is {state!r}, allowed {sorted(possible)}")
        else:
            possible = {state}
        report.leftovers_cleaned += len(clean_folder_leftovers(folder / BUNDLE, is_bundle_of, min_age_s=0))
        left = sorted(p.name for p in folder.glob(f".{BUNDLE}.*"))
        if left:
            report.problems.append(f"kill {i}: leftovers remain after cleanup: {left}")
        if identify(folder / BUNDLE) != state:
            report.problems.append(f"kill {i}: cleanup changed the bundle from {state!r} to {identify(folder / BUNDLE)!r}")
    report.seconds = time.perf_counter() - start
    return report
