"""Benchmark: why CRISP trails FiPS / Basis Sharing on MiniLM compression before distillation (issue 17; the
reduced run of bench_compress_minilm.py: embedding cosine 0.449 for CRISP s=4 vs 0.698 for FiPS at 48.6% kept).

A data-free sweep at the same kept fraction: the CRISP teacher's layout (mixer width ``s`` per role, one group
of 6 blocks per role) and the rank allocation (uniform / greedy), each student initialised from the top-r
singular components of its teacher (``init_student``, Alg. 4 line 1) and judged by the embedding's cosine
with the original on held-out WordNet glosses (``bench_compress_minilm.judge``'s measure), with no
distillation: what the layout alone gives the distillation to start from. Basis Sharing and FiPS at the
same budget are the reference points.

    .venv/bin/python bench/bench_minilm_layout.py             # minutes on one thread
    .venv/bin/python bench/bench_minilm_layout.py --quick     # s in {4, in}, 16 glosses

Writes bench/results/minilm_layout.json.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import bench_compress_minilm as bcm  # pins one thread (its --threads) before torch loads
from _common import RESULTS_DIR, machine_info, write_json

import crisp_edge as ce  # noqa: E402
from crisp_edge.errors import CrispEdgeError  # noqa: E402
from crisp_edge.data.corpora import load_text_task  # noqa: E402
from crisp_edge.models.minilm import load_minilm, sentence_embeddings, tokenize  # noqa: E402
from crisp_edge.training.compress.distill import init_student  # noqa: E402
from crisp_edge.training.compress.linear_stats import stored_params  # noqa: E402
from crisp_edge.training.compress.ranks import allocate_ranks  # noqa: E402

SCHEMA = 1
#: Mixer widths swept; "in" = s = d_in for every role (u = d_out: a shared output-side basis, the Basis Sharing
#: structure with a gate), "out" = s = d_out transposed (an input-side basis).
WIDTHS = ("4", "16", "64", "in", "out")
ROLES_IN = {"query": 384, "key": 384, "value": 384, "attn_out": 384, "fc1": 384, "fc2": 1536}
ROLES_OUT = {"query": 384, "key": 384, "value": 384, "attn_out": 384, "fc1": 1536, "fc2": 384}


def teacher_config(width: str) -> ce.CrispConfig:
    if width in ("in", "out"):
        dims = ROLES_IN if width == "in" else ROLES_OUT
        return ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=None), roles={
            r: ce.RoleConfig(s=d, group_size=None, transpose=width == "out") for r, d in dims.items()})
    return ce.CrispConfig(default=ce.RoleConfig(s=int(width), group_size=None))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--embed-texts", type=int, default=200)
    ap.add_argument("--baselines", default="basis-sharing,fips")
    ap.add_argument("--out", default=str(RESULTS_DIR / "minilm_layout.json"))
    a = ap.parse_args()
    widths = ("4", "in") if a.quick else WIDTHS
    n_texts = 16 if a.quick else a.embed_texts
    original, tok = load_minilm(num_labels=2)
    x = bcm.distill_windows(tok, 64 if a.quick else 256, 64)
    glosses = [t for t, _ in load_text_task("wordnet-nouns", max_test=n_texts).test]
    batch = tokenize(tok, glosses, max_length=64)
    ref = sentence_embeddings(original, batch)

    def cosine(model) -> float:
        return round(float((sentence_embeddings(model.eval(), batch) * ref).sum(-1).mean()), 4)

    result = {"schema": SCHEMA, "keep": a.keep, "embed_texts": n_texts, "runs": [], "machine": machine_info(),
              "cut": ["no distillation (data-free init only)", f"cosine over {n_texts} held-out glosses"]
              + (["quick: 2 widths, 64 calibration windows"] if a.quick else [])}
    budget = None
    for width in widths:
        for alloc in ("greedy", "uniform"):
            t = time.perf_counter()
            teacher = copy.deepcopy(original)
            try:
                ce.retrofit_(teacher, teacher_config(width), progress=False)
                plan = allocate_ranks(teacher, a.keep, alloc, calib=x[:64])
                student = init_student(teacher, plan, init="svd")
            except CrispEdgeError as e:  # a layout the budget cannot hold is a result too
                result["runs"].append({"method": "crisp", "s": width, "allocation": alloc, "error": str(e)})
                continue
            rec = {"method": "crisp", "s": width, "allocation": alloc, "ranks": dict(plan.role_ranks),
                   "stored": stored_params(student), "kept_fraction": round(stored_params(student) / stored_params(original), 4),
                   "mixers_per_task": ce.budget(student).trainable_per_task, "cosine": cosine(student),
                   "seconds": round(time.perf_counter() - t, 1)}
            budget = budget or plan.stored
            result["runs"].append(rec)
            print(rec, file=sys.stderr, flush=True)
            write_json(a.out, result)
    for method in filter(None, a.baselines.split(",")):
        student = bcm.build(method, None, original, None, x, budget)
        rec = {"method": method, "stored": stored_params(student),
               "kept_fraction": round(stored_params(student) / stored_params(original), 4), "cosine": cosine(student)}
        result["runs"].append(rec)
        print(rec, file=sys.stderr, flush=True)
        write_json(a.out, result)
    print(write_json(a.out, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
