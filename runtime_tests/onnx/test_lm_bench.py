"""bench/bench_lm_onnx.py --quick: the LM benchmark's toy run completes and writes every measurement
(speed claims are the benchmark's to report, not this test's to assert)."""
from __future__ import annotations


import pytest

from tests.bench.running import run_bench

pytestmark = [pytest.mark.runtime, pytest.mark.slow]


def test_quick_run_writes_speed_switch_memory_bytes_and_parity(tmp_path):
    d = run_bench("bench_lm_onnx.py", "--quick", "--no-anchor", "--workdir", str(tmp_path / "work"),
                  out=tmp_path / "lm.json")
    assert d["quick"] and d["threads"] == 1
    for mode in ("dense", "swappable"):
        p = d["parity"][mode]
        assert p["passed"] and p["tokens_equal"] and p["generation_max_logit_diff"] <= p["tolerance"]
        assert d["export"][mode]["bundle_bytes"] > 0 and d["speed"]["decode_tok_s"][mode] > 0
    assert d["parity"]["swappable"]["tasks"] == ["a", "b", "default"]
    refs = d["parity"]["swappable"]["reference_tokens_prompt0"]
    assert refs["a"] != refs["default"] and refs["b"] != refs["default"]  # the task files change the tokens
    s = d["speed"]
    assert s["prefill_ratio"] > 0 and s["decode_ratio"] > 0 and s["switch_decode_steps"] > 0
    assert s["recreate_decode_steps"] > 0 and d["memory"]["dense"]["added_kib"] >= 0
    assert set(d["met"]) == {"prefill_ratio", "decode_ratio", "switch_decode_steps", "memory_ratio", "parity"}
    tf = d["export"]["swappable"]["task_files"]["a"]
    assert tf["tensor_bytes"] <= tf["bytes"]
