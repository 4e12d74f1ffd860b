"""Benchmark: ONNX Runtime export modes vs the plain dense export, side by side, 1 thread.

Per model: the plain timm model exported the plain way (``torch.onnx.export``, TorchScript exporter,
opset 18, constant folding) is the anchor. Against it, in one interleaved run at batch 1 (batch B
for a model named ``model@B``): ``dense``, ``factored`` and ``swappable`` (a task active) forward
latency in steady state (consecutive calls, as an app's frames); the task switch
(``set_task``: one fold run, adapter preloaded) as a fraction of one swappable forward, and the switch
as a user pays it from the task file on disk (``set_task(name)`` right after the file's state changed, so
the session reads it again: read, SHA-256 against the manifest, parse and check, then the fold); and the
anchor a switch beats, recreating an ORT session on a dense model with other weights; and the floor
under any switch that materialises dense weights, one memory copy of as many bytes. Sizes: bundle
weights vs stored parameters x 4 bytes, adapter files vs the mixers' raw bytes. Parity: every
bundle's max abs difference vs PyTorch. Writes bench/results/onnx.json; exit 1 when a target is missed.

Targets (issue 5): dense <= 1.02x, swappable <= 1.10x, switch <= 0.5 forward, weights within 2%
of stored x 4 bytes, adapters within 10% + 1 KB of raw mixer bytes, parity <= 1e-4; (issue 19) the
switch from the file <= 0.3 forward.

    .venv/bin/python bench/bench_onnx.py [--models embedded,vit_small] [--repeats 30]
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from _common import (
    RESULTS_DIR,
    SWITCH_PROTOCOL,
    bench_task,
    interleave,
    load_bench_model,
    machine_info,
    pin_threads,
    steady,
    summarize,
    switch_written_bytes,
    task_switch_cases,
    timed,
    write_json,
)

THREADS = pin_threads(1)

import numpy as np
import onnxruntime as ort
import torch
from crisp_edge.export import export_onnx
from crisp_edge.export.onnx.session import session_options

import crisp_edge as ce

SCHEMA = 1
TARGETS = {"dense_ratio": 1.02, "swappable_ratio": 1.10, "switch_forwards": 0.5, "weights_rel": 0.02,
           "adapter_rel": 0.10, "adapter_slack_bytes": 1024, "parity_atol": 1e-4, "switch_from_file_forwards": 0.3}






def export_plain(plain, x, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18)
    return path


def bench_model(name: str, repeats: int, work: Path, graph_fold: bool = False) -> dict:
    plain, model, config, x = load_bench_model(name)
    print(f"{name}: exporting", flush=True)
    tasks = [bench_task(model, work / f"{name}_t{i}.safetensors", f"t{i}", i) for i in (1, 2)]
    plain_path = export_plain(plain, x, work / f"{name}_plain.onnx")
    bundles = {mode: export_onnx(model, work / f"{name}_{mode}", mode=mode, tasks=tasks if mode == "swappable" else ())
               for mode in ("dense", "factored", "swappable")}
    other = copy.deepcopy(model)  # "other weights" for the session-recreation anchor: task 2 folded
    ce.apply_mixers_(other, tasks[1])
    other_dense = export_onnx(other, work / f"{name}_other_dense", mode="dense")

    xn = x.numpy()
    plain_sess = ort.InferenceSession(str(plain_path), session_options(1), providers=["CPUExecutionProvider"])
    sessions = {mode: b.session(threads=1) for mode, b in bundles.items()}
    sessions["swappable"].set_task("t2")
    sessions["swappable"].set_task("t1")  # both adapters loaded; t1 active
    ref = plain(x).detach().numpy()
    plain_diff = float(np.abs(plain_sess.run(None, {"x": xn})[0] - ref).max())

    other_file = str(other_dense.file("model.onnx"))

    def recreate():
        return timed(lambda: ort.InferenceSession(other_file, session_options(1), providers=["CPUExecutionProvider"]))[0]

    swap = sessions["swappable"]
    t1_file = bundles["swappable"].task_path("t1")

    def switch_from_file():  # as a user pays it for a task file it has not verified: read, verify, then the fold
        os.utime(t1_file)  # a new mtime / ctime: the session's verified copy is stale, the file is read again
        return timed(lambda: swap.set_task("t1"))[0]

    def verify_file():  # the file's share alone: read, SHA-256, parse and check (no fold)
        os.utime(t1_file)
        return timed(lambda: swap.load_adapter("t1"))[0]

    extra = {}
    if graph_fold:  # the same bundle in a session that runs its fold graph (an app using ONNX Runtime alone)
        from crisp_edge.export.onnx.session import OnnxCrispSession

        OnnxCrispSession.use_fold_kernel = False
        try:
            graph = bundles["swappable"].session(threads=1)
        finally:
            OnnxCrispSession.use_fold_kernel = True
        graph.set_task("t2")
        graph.set_task("t1")
        graph_cases = task_switch_cases(graph.set_task, lambda: graph(xn), model)

        def graph_switch_from_file():
            os.utime(t1_file)
            return timed(lambda: graph.set_task("t1"))[0]

        extra = {"switch_graph_fold": graph_cases["switch"], "switch_from_file_graph_fold": graph_switch_from_file}
    cases = {
        "plain": steady(lambda: plain_sess.run(None, {"x": xn})),
        "dense": steady(lambda: sessions["dense"](xn)),
        "factored": steady(lambda: sessions["factored"](xn)),
        **task_switch_cases(swap.set_task, lambda: swap(xn), model),
        "switch_from_file": switch_from_file,
        "verify_task_file": verify_file,
        "recreate_session": recreate,
        **extra,
    }
    print(f"{name}: timing {repeats} rounds", flush=True)
    interleave(cases, 2)  # warm-up
    times = interleave(cases, repeats)
    med = {k: summarize(v) for k, v in times.items()}
    base = med["plain"]["median"]
    sw = med["swappable"]["median"]

    stored_bytes = bundles["swappable"].manifest["params"]["stored_bytes_fp32"]
    sizes = {}
    for mode, b in bundles.items():
        w = b.weights_bytes()
        sizes[mode] = {"weights_bytes": w, "stored_params_bytes": stored_bytes,
                       "rel_diff": round(w / stored_bytes - 1, 5)}
    plain_bytes = 4 * sum(p.numel() for p in plain.parameters())
    adapters = {t: {"bytes": r["bytes"], "mixer_raw_bytes": r["mixer_file_raw_bytes"],
                    "ratio": round(r["bytes"] / r["mixer_file_raw_bytes"], 4),
                    "within_target": r["bytes"] <= (1 + TARGETS["adapter_rel"]) * r["mixer_file_raw_bytes"] + TARGETS["adapter_slack_bytes"]}
                for t, r in bundles["swappable"].tasks.items()}
    parity = {mode: b.manifest["parity"]["max_abs"] for mode, b in bundles.items()}
    ratios = {
        "dense": round(med["dense"]["median"] / base, 4),
        "factored": round(med["factored"]["median"] / base, 4),
        "swappable": round(sw / base, 4),
        "switch_in_forwards": round(med["switch"]["median"] / sw, 4),
        "switch_from_file_in_forwards": round(med["switch_from_file"]["median"] / sw, 4),
        "verify_task_file_in_forwards": round(med["verify_task_file"]["median"] / sw, 4),
        "copy_floor_in_forwards": round(med["copy_dense_weights"]["median"] / sw, 4),
        "recreate_session_in_forwards": round(med["recreate_session"]["median"] / base, 4),
    }
    if graph_fold:  # in forwards of the same swappable session
        ratios["switch_graph_fold_in_forwards"] = round(med["switch_graph_fold"]["median"] / sw, 4)
        ratios["switch_from_file_graph_fold_in_forwards"] = round(med["switch_from_file_graph_fold"]["median"] / sw, 4)
    checks = {
        "dense_ratio": ratios["dense"] <= TARGETS["dense_ratio"],
        "swappable_ratio": ratios["swappable"] <= TARGETS["swappable_ratio"],
        "switch_forwards": ratios["switch_in_forwards"] <= TARGETS["switch_forwards"],
        "switch_from_file_forwards": ratios["switch_from_file_in_forwards"] <= TARGETS["switch_from_file_forwards"],
        "weights_factored": abs(sizes["factored"]["rel_diff"]) <= TARGETS["weights_rel"],
        "weights_swappable": abs(sizes["swappable"]["rel_diff"]) <= TARGETS["weights_rel"],
        "adapters": all(a["within_target"] for a in adapters.values()),
        "parity": all(v <= TARGETS["parity_atol"] for v in parity.values()),
    }
    return {
        "model": name, "crisp_config": config.to_dict(), "input_shape": list(x.shape),
        "plain_params_bytes": plain_bytes, "plain_export_max_abs_vs_torch": plain_diff,
        "fold_with": swap.fold_with,
        "switch_written_bytes": switch_written_bytes(model), "seconds": med, "ratios_to_plain": ratios, "sizes": sizes, "adapters": adapters, "parity_max_abs": parity,
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="embedded,embedded@16,vit_small,vit_base", help="comma list of: embedded, vit_small, vit_base; model@B for batch B")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--graph-fold", action="store_true",
                    help="also time the switches of a session running the bundle's fold graph (use_fold_kernel=False: "
                         "an app using ONNX Runtime alone) in the same run")
    ap.add_argument("--out", default=str(RESULTS_DIR / "onnx.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_onnx."))
    try:
        results = [bench_model(m, args.repeats, work, args.graph_fold) for m in args.models.split(",") if m]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = write_json(args.out, {
        "schema": SCHEMA, "benchmark": "onnx",
        "description": "ONNX Runtime export modes vs the plain dense export of the same model, interleaved in one "
                       "run, batch 1 (B for model@B), ORT intra-op threads 1",
        "protocol": {"repeats": args.repeats, "warmup_rounds": 2, "statistic": "median", **SWITCH_PROTOCOL,
                     "switch": "set_task with the adapter preloaded (one fold run), alternating two tasks; one call "
                               "per round, right after other cases (cold caches)",
                     "switch_from_file": "set_task('t1') right after os.utime on its .onnx_adapter (the session's "
                                         "verified copy is stale): read, SHA-256 against the manifest, parse and check, "
                                         "fold run; every call",
                     "verify_task_file": "load_adapter('t1') after the same os.utime: the file's share, without the fold",
                     "recreate_session": "ort.InferenceSession on a dense model file with other weights (creation only)",
                     "fold_with": "how the swappable session folds: 'crisp-edge kernel' (export/fold_kernel.py) or "
                                  "'onnxruntime' (the bundle's fold graph)",
                     "graph_fold": "with --graph-fold: *_graph_fold cases time the same switches in a second session "
                                   "of the same bundle running its fold graph in ONNX Runtime (an app using ONNX "
                                   "Runtime alone), interleaved in the same rounds"},
        "targets": TARGETS, "onnxruntime": ort.__version__, "machine": machine_info(), "results": results,
    })
    print(f"\n{'model':<10} {'dense':>7} {'factored':>9} {'swap':>7} {'switch/fwd':>11} {'file switch':>12} {'recreate/fwd':>13} "
          f"{'copy floor':>11} {'swap W/stored':>14} {'parity':>9}")
    for r in results:
        q = r["ratios_to_plain"]
        print(f"{r['model']:<10} {q['dense']:>7.3f} {q['factored']:>9.3f} {q['swappable']:>7.3f} "
              f"{q['switch_in_forwards']:>11.3f} {q['switch_from_file_in_forwards']:>12.3f} {q['recreate_session_in_forwards']:>13.2f} "
              f"{q['copy_floor_in_forwards']:>11.3f} "
              f"{1 + r['sizes']['swappable']['rel_diff']:>14.4f} {max(r['parity_max_abs'].values()):>9.1e}")
    print(f"wrote {out}")
    missed = [(r["model"], k) for r in results for k, ok in r["checks"].items() if not ok]
    for m, k in missed:
        print(f"MISSED target {k} on {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
