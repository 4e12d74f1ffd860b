"""Running a benchmark script the way a user does, for the tests of its ``--quick`` form."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, out: Path, timeout: int = 1200) -> dict:
    """Run ``bench/<script>`` with ``args`` in a fresh interpreter (the repository on its path, the hub
    offline, from ``bench/`` as its README says), check it succeeded, and return the JSON it wrote to
    ``out`` (passed to it as ``--out``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO / "bench", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(out).read_text())
