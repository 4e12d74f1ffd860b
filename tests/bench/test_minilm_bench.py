"""The text adaptation benchmark (bench/bench_minilm.py): its batching helpers (fast), its --quick run on the
real all-MiniLM-L6-v2 (slow: about a minute on one free core), SmolLM2's path on the toy LLaMA (fast: seconds)
and --merge (slow: three runs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
from _text import TokenizedSplit, collate, grouped_batches  # noqa: E402


def split_of(lengths: list[int]) -> TokenizedSplit:
    return TokenizedSplit([[7] * n for n in lengths], torch.arange(len(lengths)))


def test_grouped_batches_cover_every_example_once_and_group_lengths():
    lengths = [int(x) for x in torch.randint(1, 60, (500,), generator=torch.Generator().manual_seed(0))]
    split = split_of(lengths)
    a = grouped_batches(split, 8, torch.Generator().manual_seed(1))
    b = grouped_batches(split, 8, torch.Generator().manual_seed(1))
    c = grouped_batches(split, 8, torch.Generator().manual_seed(2))
    assert a == b and a != c  # seeded
    assert sorted(i for batch in a for i in batch) == list(range(500))
    assert all(len(batch) <= 8 for batch in a)
    padded = sum(8 * max(lengths[i] for i in batch) for batch in a)
    random_order = sum(8 * max(lengths[i] for i in range(k, min(k + 8, 500))) for k in range(0, 500, 8))
    assert padded < 0.8 * random_order  # grouping cuts the padding
    evaluation = grouped_batches(split, 8, None)
    flat = [i for batch in evaluation for i in batch]
    assert sorted(flat) == list(range(500)) and [lengths[i] for i in flat] == sorted(lengths)


def test_collate_masks_exactly_the_padding():
    split = split_of([3, 1, 5])
    batch = collate(split, [0, 1, 2])
    assert batch["input_ids"].shape == (3, 5) and batch["attention_mask"].sum(1).tolist() == [3, 1, 5]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["labels"].tolist() == [0, 1, 2]


@pytest.mark.slow
def test_quick_run_writes_every_method_with_its_budget(tmp_path):
    out = tmp_path / "minilm.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_minilm.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["cut"] and any(c.startswith("seeds:") for c in d["cut"])  # a quick run says what it left out
    (task, t), = d["tasks"].items()
    assert d["completed_tasks"] == [task] and t["classes"] == 15 and t["sizes"] == {"train": 64, "val": 32, "test": 32}
    m = t["methods"]
    assert set(m) == {"head", "crisp_s2", "crisp_s3", "crisp_s6", "lora_r8", "full"}
    # Trainable encoder numbers, from the layout: 36 linears; CRISP r = 6*s per group of 6 -> 6*s*s per layer;
    # LoRA r=8 -> 8*(d_in + d_out) per linear; full: everything but the head.
    assert {k: m[k]["trainable_encoder"] for k in ("head", "crisp_s2", "crisp_s3", "crisp_s6", "lora_r8")} == {
        "head": 0, "crisp_s2": 36 * 24, "crisp_s3": 36 * 54, "crisp_s6": 36 * 216,
        "lora_r8": 6 * 8 * (4 * 768 + 2 * 1920)}
    assert m["full"]["trainable_encoder"] == t["model_params_without_head"] > 22_000_000
    assert abs(m["crisp_s2"]["encoder_fraction"] - 0.00004) < 0.00001  # the paper's 0.004%
    assert all(m[k]["trainable_head"] == 384 * 15 + 15 for k in m)
    assert all(m[k]["crisp"]["retrofit_max_rel_error"] < 1e-4 for k in m if k.startswith("crisp"))
    assert all(0 <= r["test"] <= 1 and 0 <= r["val"] <= 1 for k in m for r in m[k]["runs"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compress_quick_run_holds_every_method_to_the_budget(tmp_path):
    out = tmp_path / "compress.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_compress_minilm.py"), "--quick", "--alg6", "--out",
                           str(out)], capture_output=True, text=True, timeout=1800, cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["cut"] and d["original"]["cosine"] > 0.9999  # the original agrees with itself
    # Alg. 6: the uncompressed teacher's mixers (36 linears, s=4, r=24 per group of 6 -> 96 each) against the
    # compressed student's (smaller ranks -> fewer mixer numbers), same task, head and epochs
    alg6 = d["alg6"]
    assert alg6["uncompressed_crisp"]["wordnet-verbs"]["mixers"] == 36 * 24 * 4
    (keep, compressed), = alg6["compressed"].items()
    assert keep == "0.5" and 0 < compressed["wordnet-verbs"]["mixers"] < 36 * 24 * 4
    assert 0 <= compressed["wordnet-verbs"]["test_acc"] <= 1 and set(compressed["head_only"]) == {"wordnet-verbs"}
    runs = {r["method"]: r for r in d["runs"]}
    assert set(runs) == {"crisp", "crisp-mimicry", "svd", "basis-sharing", "fips"}
    for r in runs.values():
        assert r["stored"] <= r["budget"] and 0.4 < r["kept_fraction"] <= 0.5
        assert -1 <= r["before"]["cosine"] < 1 and set(r["before"]["head_acc"]) == {"wordnet-verbs"}
        assert ("after" in r) == (r["method"] != "crisp-mimicry")


def test_quick_run_on_the_toy_llama_takes_the_smollm2_path(tmp_path):
    """``--model toy-llama --quick``: SmolLM2's path (LLaMA text classifier, its head ``score`` on the last real
    token, CRISP in groups, LoRA on the seven projections) end to end, and the README renderer on its JSON."""
    from render_readme import render_minilm_adapt
    from tests.bench.running import run_bench

    d = run_bench("bench_minilm.py", "--model", "toy-llama", "--quick", out=tmp_path / "toy_llama_adapt.json")
    assert d["benchmark"] == "toy_llama_adapt" and d["model"] == "toy-llama"
    assert "last real token" in d["protocol"]["pooling"] and d["protocol"]["dropout"] == 0.0
    assert any(c.startswith("seeds:") for c in d["cut"])
    (task, t), = d["tasks"].items()
    assert t["completed_methods"] == ["head", "crisp_s2g6", "crisp_s4g4", "crisp_s8g4", "lora_r8", "full"]
    assert t["max_length"] == 32  # the toy's window, below the task's 64
    m = t["methods"]
    # The toy: 2 blocks x 7 projections (q, o: 32x32; k, v: 16x32; gate, up: 64x32; down: 32x64). A group of 6
    # (or 4) blocks holds both, so r = 2*s at full capacity and each linear has r*s mixer numbers.
    assert {k: m[k]["trainable_encoder"] for k in ("head", "crisp_s2g6", "crisp_s4g4", "crisp_s8g4", "lora_r8")} == {
        "head": 0, "crisp_s2g6": 14 * 4 * 2, "crisp_s4g4": 14 * 8 * 4, "crisp_s8g4": 14 * 16 * 8,
        "lora_r8": 2 * 8 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))}
    assert m["crisp_s2g6"]["crisp"]["group_size"] == 2 and m["crisp_s4g4"]["crisp"]["r"] == 8
    assert all(m[k]["crisp"]["retrofit_max_rel_error"] < 1e-4 for k in m if k.startswith("crisp"))
    assert m["full"]["trainable_encoder"] == t["model_params_without_head"]
    assert all(m[k]["trainable_head"] == 32 * 15 for k in m)  # LLaMA's score head has no bias
    assert all(0 <= r["test"] <= 1 and 0 <= r["val"] <= 1 for k in m for r in m[k]["runs"])
    table = render_minilm_adapt(d)
    assert "| CRISP mixers s=2, groups of 2 + head |" in table and "toy_llama_adapt.json" in table
    assert "last real token" in table


@pytest.mark.slow
def test_merge_adds_a_method_to_an_earlier_run_without_rerunning_it(tmp_path):
    """``--merge --methods X``: a later run adds method X to the task of an earlier run made with the same other
    settings (how a long CPU run grows a point at a time); the earlier methods are kept as they were."""
    from tests.bench.running import run_bench

    out = tmp_path / "toy.json"
    args = ("--model", "toy-llama", "--tasks", "wordnet-verbs", "--seeds", "0", "--max-train", "32", "--max-val",
            "16", "--max-test", "16", "--epochs", "1", "--batch-size", "16", "--no-sweep")
    first = run_bench("bench_minilm.py", *args, "--methods", "head", out=out)
    merged = run_bench("bench_minilm.py", *args, "--methods", "crisp_s2g6", "--merge", out=out)
    t = merged["tasks"]["wordnet-verbs"]
    assert merged["config"]["methods"] == ["head", "crisp_s2g6"] == t["completed_methods"]
    assert t["methods"]["head"] == first["tasks"]["wordnet-verbs"]["methods"]["head"]  # kept, not rerun
    assert t["methods"]["crisp_s2g6"]["trainable_encoder"] == 14 * 4 * 2
    assert merged["merged_from"]["machine"] == first["machine"]
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    proc = subprocess.run([sys.executable, str(BENCH / "bench_minilm.py"), *args[:-1], "--methods", "lora_r8",
                           "--merge", "--out", str(out)], capture_output=True, text=True, cwd=BENCH, env=env)
    assert proc.returncode == 2 and "other settings" in proc.stderr  # a sweep differs: refused, file untouched
    assert json.loads(out.read_text()) == merged
