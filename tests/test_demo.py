"""The main job (`crisp-edge demo`) runs end to end and its numbers hold what the README shows."""
from __future__ import annotations

from crisp_edge.demo import run_demo


def test_demo_end_to_end(tmp_path, capsys):
    r = run_demo(out_dir=tmp_path, limit=500, adapt_epochs=1)
    assert r["top1_agreement"] == 1.0 and r["worst_layer_error"] <= 1e-5
    assert r["checkpoint_roundtrip_identical"] and r["switch_back_identical"]
    for name, task in r["tasks"].items():
        assert task["file_bytes"] <= 1.10 * task["raw_bytes"] + 1024, name
        assert r["onnx"][name]["top1_agreement"] == 1.0 and r["onnx"][name]["max_abs_diff"] <= 1e-4
    assert "LayoutMismatchError" in capsys.readouterr().out
