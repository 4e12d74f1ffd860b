"""bench/bench_lm_quantize.py --quick (ONNX Runtime; the ExecuTorch half lowers three programs, minutes on a
shared machine, and is the same code path per runtime): the toy run completes, writes bytes, perplexity
computed by each bundle, speed ratios and parity per precision, and its README table renders (speed claims
are the benchmark's to report, not this test's to assert)."""
from __future__ import annotations

import sys

import pytest

from tests.bench.running import REPO, run_bench

pytestmark = [pytest.mark.runtime, pytest.mark.slow]


def test_quick_run_writes_bytes_perplexity_speed_and_parity(tmp_path):
    d = run_bench("bench_lm_quantize.py", "--quick", "--runtimes", "onnxruntime", "--work", str(tmp_path / "work"),
                  out=tmp_path / "lmq.json")
    assert d["complete"] and d["quick"] and d["threads"] == 1
    assert any("executorch" in c for c in d["cut"]) and any(c.startswith("quick:") for c in d["cut"])
    v = d["runtimes"]["onnxruntime"]
    assert v["ratios"]["int4"]["bytes"] < v["ratios"]["int8"]["bytes"] < 0.4
    for p, b in v["bundles"].items():
        assert all(g["passed"] for g in b["generation"]), (p, b["generation"])
        assert set(b["perplexity"]) == {"kjv-nt", "devil"} and all(x["tokens"] > 0 for x in b["perplexity"].values())
    for name, ppl in d["pytorch_float32_perplexity"].items():  # the float32 bundle scores as PyTorch does
        assert abs(v["bundles"]["float32"]["perplexity"][name]["perplexity"] / ppl - 1) < 1e-4
    assert v["ratios"]["int8"]["decode_speed"] > 0 and v["ratios"]["int4"]["prefill_speed"] > 0
    sys.path.insert(0, str(REPO / "bench"))
    from render_readme import render_lm_quantize

    table = render_lm_quantize(d)
    assert "| ONNX Runtime | int4 |" in table and "within 10%" in table


def test_precisions_runs_float32_and_the_named_scheme_only(tmp_path):
    """--precisions int4: float32 (every ratio's base) and int4 are exported, int8 is not, and the cut says so."""
    d = run_bench("bench_lm_quantize.py", "--quick", "--runtimes", "onnxruntime", "--precisions", "int4",
                  "--work", str(tmp_path / "work"), out=tmp_path / "lmq.json")
    v = d["runtimes"]["onnxruntime"]
    assert d["complete"] and set(v["bundles"]) == {"float32", "int4"} and set(v["ratios"]) == {"int4"}
    assert "precision int8: not run (--precisions)" in d["cut"]
    assert set(d["meets_targets"]) == {"onnxruntime_int4_kjv-nt", "onnxruntime_int4_devil", "parity"}
