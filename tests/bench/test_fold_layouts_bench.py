"""bench/bench_fold_layouts.py --quick --executorch: every fold layout it times computes the weights numpy
computes (ONNX Runtime) or PyTorch computes (ExecuTorch's set_task, checked through forward), and its
``shipped`` kind is the fold the exporter builds (slow: the ExecuTorch lowerings take about half a minute)."""
from __future__ import annotations

import pytest

from tests.bench.running import run_bench


@pytest.mark.slow
def test_quick_run_checks_every_layout_against_the_reference(tmp_path):
    d = run_bench("bench_fold_layouts.py", "--quick", "--executorch", out=tmp_path / "fold_layouts.json", timeout=900)
    r = d["results"][0]
    assert r["shipped_is_exported"] is True  # the timed "shipped" graph is export/onnx/fold.py's
    kinds = {"shipped", "prepacked", "narrow", "wide_cols", "wt_split"}
    assert set(r["fold_vs_shipped"]) == kinds and r["fold_vs_shipped"]["shipped"] == 1.0
    assert set(r["fold_vs_shipped_by_role"]) == {"qkv", "proj", "fc1", "fc2"}
    assert set(r["executorch_set_task_vs_narrow"]) == {"narrow", "wide_cols", "transposed"}
    assert all(v["median"] > 0 for v in r["seconds"].values())
    assert "forward_Wt_vs_W" not in r  # --quick leaves the forward side out


def test_baseline_build_is_timed_beside_this_one_after_its_codes_are_checked(tmp_path):
    """--baseline REV builds the fold kernel as of REV beside this checkout's and times its channel-major fold +
    quantization in the same run, after checking it gives this build's codes (HEAD: the same source, so the same
    codes; a REV git does not have is refused with git's reason)."""
    d = run_bench("bench_fold_layouts.py", "--quick", "--kernels-only", "--crisp-quant", "--baseline", "HEAD",
                  out=tmp_path / "fold_quant_kernel.json", timeout=600)
    r = d["results"][0]
    assert d["protocol"]["baseline"] == "HEAD"
    assert set(r["crisp_quant_seconds"]) == {"f32", "i8", "i8_cm", "i8_cm_baseline"}
    assert set(r["crisp_quant_i8_cm_vs_baseline"]) == {"qkv", "proj", "fc1", "fc2"}
    assert r["crisp_quant_i8_cm_vs_baseline_all_groups"] > 0
    with pytest.raises(AssertionError, match="no-such-revision"):
        run_bench("bench_fold_layouts.py", "--quick", "--kernels-only", "--crisp-quant", "--baseline",
                  "no-such-revision", out=tmp_path / "refused.json", timeout=600)
