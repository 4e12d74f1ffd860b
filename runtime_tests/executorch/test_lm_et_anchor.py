"""bench/bench_lm_et_anchor.py --quick: our ExecuTorch LM export and ExecuTorch's own Llama export of the same
weights (converted to Meta's layout) run side by side and agree; the run writes every measurement (speed
ratios are the benchmark's to report, not this test's to assert)."""
from __future__ import annotations


import pytest

from crisp_edge.export.parity.compare import tolerance_for
from tests.bench.running import run_bench

pytestmark = [pytest.mark.runtime, pytest.mark.slow]


def test_quick_run_compares_the_same_model_and_writes_speed_sizes_and_profile(tmp_path):
    d = run_bench("bench_lm_et_anchor.py", "--quick", "--work", str(tmp_path / "work"), out=tmp_path / "anchor.json")
    assert d["complete"] and d["quick"] and d["threads"] == 1
    # the same model: both programs give PyTorch's greedy tokens (which vary: the check means something)
    p = d["parity"]
    assert p["same_tokens"] and len(set(p["torch_tokens"])) > 4 and len(p["torch_tokens"]) == 32
    atol = tolerance_for("executorch-lm", "dense", "float32").atol
    assert p["max_abs_logit_diff_ours_vs_anchor"] <= atol
    assert all(p[k]["tokens_equal_torch"] and p[k]["max_abs_logit_diff_vs_torch"] <= atol for k in ("ours", "anchor"))
    # the anchor is ExecuTorch's custom-op path; ours runs on stock kernels (any runner)
    e = d["exports"]
    kernels = {k: e[k]["instructions"]["kernels"] for k in ("ours", "anchor")}
    assert {"llama::custom_sdpa.out", "llama::update_cache.out"} <= set(kernels["anchor"])
    assert not any(op.startswith("llama::") for op in kernels["ours"])
    assert all(e[k]["pte_bytes"] > 0 and e[k]["instructions"]["delegate_calls"] > 0 for k in ("ours", "anchor"))
    s = d["speed"]
    for phase, rates in (("prefill", s["prefill_tok_s"]), ("decode", s["decode_tok_s"])):
        assert rates["ours"] > 0 and rates["anchor"] > 0
        # the ratio is ours / anchor in speed (anchor time / our time), from the same medians as the rates
        assert s["ratio_ours_over_anchor"][phase] == pytest.approx(rates["ours"] / rates["anchor"], rel=0.02)
    for k in ("ours", "anchor"):
        prof = d["profile"][k]
        assert prof["prefill"]["ms"]["total"] > 0 and prof["decode"]["ms"]["xnnpack"] > 0
        assert prof["decode"]["top_ops_ms"]
