"""Benchmark: ExecuTorch task ``.ptd`` bytes against the bytes of their tensors (issue 18: a task file
within 10% + 1 KB of its mixers).

For each model, one task's mixer file (as the model's ExecuTorch benchmark makes it) is written as a task
file two ways, with the same serializer, alignment, tag and digest: as crisp-edge writes it now (every
mixer group in one ``crisp.mixers`` tensor, ``tasks.ptd_bytes``) and as it did before (one FlatTensor entry
per group, each ~114 bytes of name, layout and segment tables). A file's bytes depend on its tensors
alone, so no program is exported: the SmolLM2 row costs a model load and a retrofit (seconds, ~2 GB; run
it under the shared SmolLM2 lock), not the 16 GB ExecuTorch export.

Models: ``embedded`` and ``vit_small`` (bench_executorch.py's ViTs and task files, head included),
``smollm2`` (SmolLM2-135M-Instruct at full capacity, bench_lm_executorch.py's task file) and
``smollm2_shaped8`` (its shapes with 8 layers, random weights: no lock). Writes bench/results/task_files.json.

    flock -s /work/notes/smollm2.lock .venv/bin/python bench/bench_task_files.py [--models embedded,vit_small,smollm2]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import RESULTS_DIR, bench_task, load_bench_model, machine_info, write_json
from bench_lm_executorch import THREADS  # noqa: F401  (importing it pins 1 thread, before torch loads)
from bench_lm_executorch import build_model as build_lm

import numpy as np  # noqa: E402

SCHEMA = 1
TARGETS = {"task_rel": 0.10, "task_slack_bytes": 1024}
MODELS = ("embedded", "vit_small", "smollm2_shaped8", "smollm2")


def mixer_file(name: str, work: Path) -> Path:
    """The task mixer file the model's ExecuTorch benchmark ships (its first task)."""
    if name.startswith("smollm2"):
        from crisp_edge.testing import make_lm_task_file

        shaped = int(name.removeprefix("smollm2_shaped")) if name != "smollm2" else None
        model = build_lm(False, shaped)[0]
        return make_lm_task_file(model, work / f"{name}.mixers.safetensors", task="alpha", seed=1, scale=0.05)
    return bench_task(load_bench_model(name)[1], work / f"{name}.safetensors", "t1", 1)


def measure(path: Path) -> dict:
    """Bytes of the task file of mixer file ``path``, written now (packed) and per group (before)."""
    from crisp_edge.export.executorch.bundle import TAG_KEY
    from crisp_edge.export.executorch.digest import DIGEST_KEY, ptd_digest
    from crisp_edge.export.executorch.tasks import flat_tensor_bytes, parse_ptd, ptd_bytes
    from crisp_edge.files.mixers import read_mixers

    mf = read_mixers(path)
    arrays = {k: v.detach().float().contiguous().numpy() for k, v in sorted(mf.tensors.items())}
    tag = 1234567  # any 31-bit tag: it is 8 bytes in both layouts
    per_group = {**arrays, TAG_KEY: np.array([tag], np.int64)}
    per_group[DIGEST_KEY] = ptd_digest(per_group)
    files = {"packed": ptd_bytes(arrays, tag), "per_group": flat_tensor_bytes(per_group)}
    tensor_bytes = sum(a.nbytes for a in arrays.values())
    limit = tensor_bytes * (1 + TARGETS["task_rel"]) + TARGETS["task_slack_bytes"]
    out = {"tensors": len(arrays), "mixer_groups": sum(not k.startswith("head.") for k in arrays),
           "tensor_bytes": tensor_bytes, "mixer_file_raw_bytes": mf.raw_bytes, "limit_bytes": round(limit)}
    for layout, data in files.items():
        out[layout] = {"bytes": len(data), "entries": len(parse_ptd(data, layout)),
                       "over_tensors": round(len(data) / tensor_bytes - 1, 4), "within_target": len(data) <= limit}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of: {', '.join(MODELS)}")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out) if args.out else RESULTS_DIR / "task_files.json"
    result = {"schema": SCHEMA, "benchmark": "task_files", "machine": machine_info(), "targets": TARGETS, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_task_files_") as work:
        for name in args.models.split(","):
            result["models"][name] = measure(mixer_file(name, Path(work)))
            print(name, result["models"][name], flush=True)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
