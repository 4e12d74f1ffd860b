"""bench/combine_parts.py: parts of one benchmark configuration run as parallel processes combine into the file
the README renders; parts of different configurations, or the same method twice, are refused."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
from combine_parts import combine_adapt, combine_compress  # noqa: E402

TOY = ("--model", "toy-llama", "--tasks", "wordnet-verbs", "--seeds", "0", "--max-train", "32", "--max-val", "16",
       "--max-test", "16", "--epochs", "1", "--batch-size", "16", "--no-sweep")


def test_adapt_parts_split_by_method_combine_into_one_run(tmp_path):
    from render_readme import render_minilm_adapt
    from tests.bench.running import run_bench

    a = run_bench("bench_minilm.py", *TOY, "--methods", "head", out=tmp_path / "a.json")
    b = run_bench("bench_minilm.py", *TOY, "--methods", "lora_r8,crisp_s2g6", out=tmp_path / "b.json")
    d = combine_adapt([b, a], [tmp_path / "b.json", tmp_path / "a.json"], "toy_llama_adapt")
    t = d["tasks"]["wordnet-verbs"]
    # the model's method order, whatever the parts' order; each part's runs kept as they were
    assert d["config"]["methods"] == ["head", "crisp_s2g6", "lora_r8"] == t["completed_methods"]
    assert t["methods"]["head"] == a["tasks"]["wordnet-verbs"]["methods"]["head"]
    assert t["methods"]["lora_r8"] == b["tasks"]["wordnet-verbs"]["methods"]["lora_r8"]
    assert set(t["sweep_seed0"]) == {"head", "crisp_s2g6", "lora_r8"}
    assert [p["file"] for p in d["parts"]] == ["b.json", "a.json"]
    assert any(c.startswith("methods:") for c in d["cut"])  # crisp_s4g4, crisp_s8g4 and full never ran
    assert "Run as 2 parallel processes" in render_minilm_adapt(d)

    with pytest.raises(SystemExit, match="appear in two parts"):
        combine_adapt([a, a], [tmp_path / "a.json"] * 2, "x")
    other = copy.deepcopy(a)
    other["config"]["epochs"] = 3
    with pytest.raises(SystemExit, match=r"other settings .*epochs"):
        combine_adapt([b, other], [tmp_path / "b.json", tmp_path / "other.json"], "x")


def _compress_part(keep: float, lr: float, methods: list[str], alg6: bool = False) -> dict:
    runs = [{"method": m, "keep_fraction": keep, "kept_fraction": keep, "stored": 10, "budget": 10,
             "before": {"cosine": 0.5, "head_acc": {"t": 0.4}}, "after": {"cosine": 0.6, "head_acc": {"t": 0.5}}}
            for m in methods]
    full = {"keeps": [0.5, 0.25], "methods": ["crisp", "svd"], "distill_lr": 2e-4, "windows": 8}
    d = {"benchmark": "part", "config": {**full, "keeps": [keep], "methods": methods, "distill_lr": lr},
         "full_config": full, "cut": [], "original": {"stored_targeted": 20, "cosine": 1.0, "head_acc": {"t": 0.7}},
         "machine": {"date": "2026-11-30"}, "runs": runs, "wall_seconds": 5.0}
    if alg6:
        d["alg6"] = {"uncompressed_crisp": {"t": {"test_acc": 0.8}}, "compressed": {str(keep): {"t": {"test_acc": 0.7}}}}
    return d


def test_compress_parts_split_by_kept_fraction_and_rate_combine(tmp_path):
    paths = [tmp_path / f"{i}.json" for i in range(3)]
    parts = [_compress_part(0.5, 2e-4, ["crisp", "svd"], alg6=True), _compress_part(0.25, 2e-4, ["crisp", "svd"]),
             _compress_part(0.5, 1e-3, ["svd"])]
    d = combine_compress(parts, paths, "minilm_compress")
    assert d["config"]["keeps"] == [0.5, 0.25] and d["config"]["distill_lr"] == [2e-4, 1e-3]
    assert [(r["method"], r["keep_fraction"], r["distill_lr"]) for r in d["runs"]] == [
        ("crisp", 0.5, 2e-4), ("svd", 0.5, 2e-4), ("crisp", 0.25, 2e-4), ("svd", 0.25, 2e-4), ("svd", 0.5, 1e-3)]
    assert d["alg6"]["compressed"] == {"0.5": {"t": {"test_acc": 0.7}}}
    assert d["cut"] == ["distill_lr: [0.0002, 0.001] instead of 0.0002"]
    one_rate = combine_compress(parts[:2], paths[:2], "minilm_compress")
    assert one_rate["config"]["distill_lr"] == 2e-4 and one_rate["cut"] == []  # every full setting covered

    judged_otherwise = copy.deepcopy(parts[1])
    judged_otherwise["original"]["head_acc"]["t"] = 0.69
    with pytest.raises(SystemExit, match="judged the original model differently"):
        combine_compress([parts[0], judged_otherwise], paths[:2], "x")
    more_windows = copy.deepcopy(parts[1])
    more_windows["config"]["windows"] = 16
    with pytest.raises(SystemExit, match="windows"):
        combine_compress([parts[0], more_windows], paths[:2], "x")
