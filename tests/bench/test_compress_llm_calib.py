"""bench_compress_llm.py --calib: which texts calibrate and which judge (the real Debian texts, a few seconds)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_compress_llm  # noqa: E402


def test_english_calibration_is_general_english_and_never_a_heldout_text():
    calib, heldout = bench_compress_llm.calibration_and_heldout("english")
    assert set(heldout) == {"devil", "fortunes", "kjv-nt"}
    assert len(calib) > 500_000 and all(len(t) > 300_000 for t in heldout.values())
    calib_paragraphs = set(calib.splitlines())
    for name, text in heldout.items():
        paragraphs = [p for p in text.splitlines() if len(p) > 80][:200]
        assert paragraphs and not calib_paragraphs.intersection(paragraphs), name


def test_kjv_calibration_keeps_the_earlier_split():
    calib, heldout = bench_compress_llm.calibration_and_heldout("kjv")
    assert list(heldout) == ["kjv-nt"] and "In the beginning God created" in calib[:200]
    assert "In the beginning God created" not in heldout["kjv-nt"]


SETTINGS = {"keep": 0.7, "eval_tokens": 8192, "calib": "english"}


def test_merge_keeps_other_methods_replaces_a_rerun_and_refuses_other_settings():
    old = {"settings": SETTINGS, "quick": False, "runs": {"original": {"a": 1}, "svd": {"a": 2}},
           "failures": {"crisp": "exit status 1"}, "notes": ["cut: time"]}
    runs, failures, notes = bench_compress_llm.earlier_runs(old, dict(SETTINGS), False, ["svd", "crisp"], ["more"])
    assert runs == {"original": {"a": 1}} and failures == {} and notes == ["cut: time", "more"]
    for settings, quick in ((SETTINGS | {"keep": 0.5}, False), (SETTINGS, True)):
        try:
            bench_compress_llm.earlier_runs(old, settings, quick, ["svd"], [])
        except ValueError as e:
            assert "other settings" in str(e)
        else:
            raise AssertionError("a run of other settings was merged")
