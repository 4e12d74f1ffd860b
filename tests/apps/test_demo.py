"""The main job (`crisp-edge demo`) runs end to end and its numbers hold what the README shows."""
from __future__ import annotations

import json

from crisp_edge.apps.demo import run_demo


def test_demo_end_to_end(tmp_path, capsys):
    r = run_demo(out_dir=tmp_path, limit=300, adapt_epochs=1, train_limit=256, distill_fraction=0.005,
                 distill_epochs=1)
    assert r["top1_agreement"] == 1.0 and r["worst_layer_error"] <= 1e-5
    compress = r["pipeline"]["compress"]
    assert compress["kept_fraction"] <= 0.5 and compress["stored"] < r["pipeline"]["retrofit"]["stored"] / 2
    assert r["switch_back_identical"]
    for name, task in r["pipeline"]["adapt"]["tasks"].items():
        assert task["bases_unchanged"], name
        for runtime, atol in (("onnx", 1e-4), ("executorch", 1e-3)):
            assert r[runtime][name]["top1_agreement"] == 1.0 and r[runtime][name]["max_abs_diff"] <= atol, (runtime, name)
    for runtime in ("onnx", "executorch"):
        assert r["parity"][runtime]["passed"], runtime
        report = json.loads((tmp_path / f"parity-{runtime}" / "parity.json").read_text())
        assert report["passed"] is True
    assert "LayoutMismatchError" in capsys.readouterr().out
