"""Benchmark: how long the whole parity suite (``make parity``) takes on this machine.

Runs ``pytest`` on the parity suite (runtime_tests/parity/: test_parity.py, test_faults.py,
test_matrix.py: architecture x mode x runtime x task, fault injection for ONNX Runtime and
ExecuTorch, the C++ runner's outputs) in a subprocess, and records its wall time, the number of tests
passed/failed, and the machine. Writes ``bench/results/parity_suite.json``.

    .venv/bin/python bench/bench_parity_suite.py
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

from _common import REPO_ROOT, RESULTS_DIR, machine_info, write_json

SUITE = ["runtime_tests/parity/"]


def main() -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", tail)}
    print(tail)
    print(f"parity suite: {seconds:.0f} s wall")
    write_json(RESULTS_DIR / "parity_suite.json", {
        "schema": 1, "benchmark": "parity_suite", "machine": machine_info(), "command": "make parity",
        "pytest_args": SUITE, "wall_seconds": seconds, "counts": counts, "summary_line": tail,
        "returncode": proc.returncode})
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
