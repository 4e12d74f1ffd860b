"""bench/render_readme.py's English-calibrated SmolLM2 table: both rates x every held-out text in one table,
each compressed method against Basis Sharing, the lowest per cell named, and what was not run said."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ("devil", "fortunes", "kjv-nt")


def _renderer():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "bench" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(stored: int, before: float, after: tuple[float, ...]) -> dict:
    ev = lambda ps: {"perplexity": ps[0], "by_text": {t: {"perplexity": p} for t, p in zip(TEXTS, ps)}}  # noqa: E731
    return {"stored": stored, "eval_before_calibration": ev((before,) * 3), "eval": ev(after),
            "total_compress_seconds": 10.0, "report": {}, "calibration": {"history": {"lm": [before / 10, 3.0]}}}


def _file(keep: float, runs: dict, notes: list[str]) -> dict:
    settings = {"keep": keep, "calib_windows": 32, "calib_len": 256, "steps": 16, "eval_tokens": 8192, "window": 512,
                "calib": "english"}
    return {"settings": settings, "runs": runs, "failures": {}, "notes": notes}


def test_english_table_shows_both_rates_every_text_and_the_lowest(tmp_path, monkeypatch):
    module = _renderer()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    original = {"stored": 100, "eval": {"perplexity": 20.0, "by_text": {t: {"perplexity": 20.0 + i}
                                                                        for i, t in enumerate(TEXTS)}}}
    k70 = _file(0.7, {"original": original, "basis_sharing": _run(70, 90.0, (50.0, 60.0, 40.0)),
                      "crisp_truncate": _run(70, 80.0, (45.0, 66.0, 40.0))}, ["eval tokens cut: time"])
    k50 = _file(0.5, {"basis_sharing": _run(50, 300.0, (100.0, 120.0, 90.0)),
                      "crisp_truncate": _run(50, 200.0, (99.0, 110.0, 80.0))}, [])
    (tmp_path / "compress_llm_english_50.json").write_text(json.dumps(k50))
    text = module.render_compress_llm_english(k70)
    header = text.splitlines()[0]
    assert all(t in header for t in TEXTS)
    rows = [line for line in text.splitlines() if line.startswith("| CRISP")]
    assert [r.split(" | ")[1] for r in rows] == ["30%", "50%"]
    assert "-10.0% / +10.0% / +0.0% | 5.500 |" in rows[0]  # against Basis Sharing per text; calibration loss
    assert "| original SmolLM2-135M | 0% | 100 | 20.00 | 21.00 | 22.00 |" in text
    assert "30% off, devil: lowest CRISP" in text and "30% off, fortunes: lowest Basis Sharing" in text
    assert "50% off, kjv-nt: lowest CRISP" in text
    assert "not run (svd)" in text and "eval tokens cut: time" in text
