"""bench/bench_adapt_lm.py --quick: the toy LLaMA through retrofit, two text tasks as mixer files, the 2x2
perplexity table and LoRA, on the real Debian texts (slow: about half a minute)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crisp_edge.files.mixers import read_mixers

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
def test_quick_run_writes_the_table_and_the_task_files(tmp_path):
    out, files = tmp_path / "adapt_lm.json", tmp_path / "tasks"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_adapt_lm.py"), "--quick", "--out", str(out),
                           "--keep-files", str(files)], capture_output=True, text=True, timeout=900, cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    domains = ["kjv", "debian-reference"]
    assert d["cut"][0].startswith("quick:") and d["completed"][-1] == "lora debian-reference"
    assert d["retrofit"]["max_rel_error"] < 1e-5  # full capacity: exact
    ppl = d["perplexity"]
    assert set(ppl["original"]) == set(domains)
    for method in ("crisp", "lora_r8"):
        assert set(ppl[method]) == set(domains) and all(set(row) == set(domains) for row in ppl[method].values())
    for task in domains:
        t = d["crisp_tasks"][task]
        # the toy: 2 blocks, 7 roles, one group of 2 per role at s=4, r=8 -> 2*8*4 mixer numbers per role
        assert t["trainable"] == 7 * 2 * 8 * 4 and t["bases_unchanged"]
        mf = read_mixers(files / f"{task}.mixers.safetensors")
        assert mf.task == task and mf.nbytes == t["file_bytes"]
        assert ppl["crisp"][task][task] < ppl["original"][task]  # a task lowers its own domain's perplexity
        assert d["lora_tasks"][task]["trainable"] == 2 * 8 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))  # q,o; k,v; gate,up,down
