"""Benchmark: ExecuTorch export modes vs the plain dense XNNPACK program, side by side, 1 thread.

Per model: the plain timm model lowered the plain way (``torch.export`` + ``XnnpackPartitioner()``,
timm's fused attention turned off as in every crisp-edge export, so the anchor is the fast one) is
the anchor; the same with timm's default fused attention is timed too (``plain_fused_attention``).
Against it, in one interleaved run at batch 1 (batch B for a model named ``model@B``): ``dense``,
``factored`` and ``swappable`` (a task active) forward latency in steady state (each program's ``forward`` method, called as the anchor's
is, consecutively as an app's frames); the task
switch (``set_task`` with the task's tensors already read, and from the ``.ptd`` file on disk: by name
right after the file's state changed, so the session reads and verifies it again) in forwards of
the swappable program; and the anchor a switch beats, reloading a whole dense program
(``load_program`` + ``load_method``, file in page cache); and the floor under any switch that
materialises dense weights, one memory copy of as many bytes. Sizes: ``.pte`` (+ ``default.ptd``, the
exported mixers) vs stored parameters x 4 bytes (the rest is the program), task ``.ptd`` vs the
mixers' raw bytes. Parity: every bundle's max abs difference vs PyTorch on its reference cases and
top-1 agreement on real Fashion-MNIST test images (embedded model). Writes bench/results/executorch.json.

Targets (issue 6): dense <= 1.02x, swappable <= 1.10x, switch <= 1 forward, .pte within 2% of stored
x 4 bytes (plus the program), task .ptd within 10% + 1 KB of raw mixer bytes, parity <= 1e-3 (XNNPACK);
(issue 19) the switch from the file <= 0.3 forward.

    .venv/bin/python bench/bench_executorch.py [--models embedded,vit_small] [--repeats 30] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
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
    task_switch_cases,
    timed,
    write_json,
)

THREADS = pin_threads(1)

import numpy as np
import torch
from crisp_edge.export.executorch.export import export_executorch, lower
from crisp_edge.export.executorch.programs import _unfuse_attention
from crisp_edge.export.executorch.session import load_program, set_threads
from crisp_edge.export.model_io import _Forward

SCHEMA = 1
TARGETS = {"dense_ratio": 1.02, "swappable_ratio": 1.10, "switch_forwards": 1.0, "pte_rel": 0.02,
           "task_rel": 0.10, "task_slack_bytes": 1024, "parity_atol": 1e-3, "top1_agreement": 1.0,
           "switch_from_file_forwards": 0.3}






def plain_program(plain, x, fused: bool = False) -> bytes:
    m = copy.deepcopy(plain).eval()
    if not fused:
        _unfuse_attention(m)
    for p in m.parameters():
        p.requires_grad_(False)
    pte, _ = lower({"forward": _Forward(m, ["x"]).eval()}, {"forward": (x,)}, "xnnpack", "dense")
    return pte


def real_agreement(sessions: dict, model, limit: int) -> dict:
    """Top-1 agreement with PyTorch on Fashion-MNIST test images (embedded model; batch-1 programs)."""
    from crisp_edge.data.fashion_mnist import load_fashion_mnist

    xs, _ = load_fashion_mnist("test", limit=limit)
    with torch.no_grad():
        ref = model(xs).argmax(-1).numpy()
    out = {}
    for mode, sess in sessions.items():
        if sess.swappable:
            sess.set_task("default")
        got = np.array([sess(xs[i:i + 1]).argmax(-1)[0] for i in range(len(xs))])
        out[mode] = float((got == ref).mean())
    return out


def stock_fold_bundle(model, folder: Path, x, tasks):
    """The swappable bundle as exported before ``crisp::fold_``: set_task from stock operators only (one XNNPACK
    product a layer, a write-back copy each)."""
    from crisp_edge.export.executorch.programs import _SwapProgram

    _SwapProgram.fused_fold = False
    try:
        return export_executorch(model, folder, mode="swappable", recipe="xnnpack", example_input=x, tasks=tasks)
    finally:
        _SwapProgram.fused_fold = True


def bench_model(name: str, repeats: int, work: Path, modes: list[str], eval_limit: int,
                stock_fold: bool = False) -> dict:
    plain, model, config, x = load_bench_model(name)
    print(f"{name}: exporting {modes} (+ the plain anchor)", flush=True)
    tasks = [bench_task(model, work / f"{name}_t{i}.safetensors", f"t{i}", i) for i in (1, 2)]
    t0 = time.perf_counter()
    plain_pte = plain_program(plain, x)
    export_s = {"plain": round(time.perf_counter() - t0, 1)}
    fused_pte = plain_program(plain, x, fused=True)  # timm's default attention, for reference
    bundles = {}
    for mode in modes:
        t0 = time.perf_counter()
        bundles[mode] = export_executorch(model, work / f"{name}_{mode}", mode=mode, recipe="xnnpack", example_input=x,
                                          tasks=tasks if mode == "swappable" else ())
        export_s[mode] = round(time.perf_counter() - t0, 1)
    if stock_fold and "swappable" in modes:
        t0 = time.perf_counter()
        stock = stock_fold_bundle(model, work / f"{name}_swappable_stock_fold", x, tasks)
        export_s["swappable_stock_fold"] = round(time.perf_counter() - t0, 1)
    set_threads(1)
    plain_prog = load_program(plain_pte, "plain")
    plain_fwd = plain_prog.load_method("forward")
    with torch.no_grad():
        plain_diff = float((plain_fwd.execute([x])[0] - plain(x)).abs().max())
    sessions = {mode: b.session(threads=1) for mode, b in bundles.items()}
    fused_fwd = load_program(fused_pte, "plain_fused").load_method("forward")
    cases = {"plain": steady(lambda: plain_fwd.execute([x])),
             "plain_fused_attention": steady(lambda: fused_fwd.execute([x]))}

    def forward_case(sess):  # the program's forward, as for the anchor (no session wrapper)
        return steady(lambda: sess.forward.execute([x]))

    for mode, sess in sessions.items():
        if mode != "swappable":
            cases[mode] = forward_case(sess)
    if "swappable" in sessions:
        swap = sessions["swappable"]
        swap.set_task("t2")
        swap.set_task("t1")  # both tasks read and cached; t1 active
        t1_file = bundles["swappable"].task_path("t1")

        def switch_from_file():  # as a user pays it for a task file it has not verified: read, verify, set_task
            os.utime(t1_file)  # a new mtime / ctime: the session's verified copy is stale, the file is read again
            return timed(lambda: swap.set_task("t1"))[0]

        def verify_file():  # the file's share alone (the session's own resolver: read, SHA-256, parse, check)
            os.utime(t1_file)
            return timed(lambda: swap._resolve("t1"))[0]

        cases.update({**task_switch_cases(swap.set_task, lambda: swap.forward.execute([x]), model),
                      "switch_from_file": switch_from_file, "verify_task_file": verify_file})
        if stock_fold:  # the same switches on the bundle whose set_task uses stock operators only
            old = stock.session(threads=1)
            old.set_task("t2")
            old.set_task("t1")
            old_cases = task_switch_cases(old.set_task, lambda: old.forward.execute([x]), model)
            old_t1 = stock.task_path("t1")

            def old_switch_from_file():
                os.utime(old_t1)
                return timed(lambda: old.set_task("t1"))[0]

            cases.update({"swappable_stock_fold": old_cases["swappable"], "switch_stock_fold": old_cases["switch"],
                          "switch_from_file_stock_fold": old_switch_from_file})
    dense_file = bundles["dense"].file("model.pte") if "dense" in bundles else None

    def reload():
        def load():
            p = load_program(dense_file.read_bytes(), str(dense_file))
            return p.load_method("forward")
        return timed(load)[0]

    if dense_file is not None:
        cases["reload_program"] = reload
    print(f"{name}: timing {repeats} rounds", flush=True)
    interleave(cases, 2)  # warm-up
    med = {k: summarize(v) for k, v in interleave(cases, repeats).items()}
    base = med["plain"]["median"]
    ratios = {m: round(med[m]["median"] / base, 4) for m in modes + ["plain_fused_attention"]}
    if "swappable" in med:
        sw = med["swappable"]["median"]
        ratios["switch_in_forwards"] = round(med["switch"]["median"] / sw, 4)
        ratios["switch_from_file_in_forwards"] = round(med["switch_from_file"]["median"] / sw, 4)
        ratios["verify_task_file_in_forwards"] = round(med["verify_task_file"]["median"] / sw, 4)
        ratios["copy_floor_in_forwards"] = round(med["copy_dense_weights"]["median"] / sw, 4)
        if "switch_stock_fold" in med:  # in forwards of its own program, as the switch above
            old_sw = med["swappable_stock_fold"]["median"]
            ratios["swappable_stock_fold"] = round(old_sw / base, 4)
            ratios["switch_stock_fold_in_forwards"] = round(med["switch_stock_fold"]["median"] / old_sw, 4)
            ratios["switch_from_file_stock_fold_in_forwards"] = round(med["switch_from_file_stock_fold"]["median"]
                                                                      / old_sw, 4)
    if "reload_program" in med:
        ratios["reload_program_in_forwards"] = round(med["reload_program"]["median"] / base, 4)

    stored_bytes = next(iter(bundles.values())).manifest["params"]["stored_bytes_fp32"]
    plain_bytes = 4 * sum(p.numel() for p in plain.parameters())
    sizes = {"plain": {"pte_bytes": len(plain_pte), "params_bytes": plain_bytes}}
    for mode, b in bundles.items():
        pte = b.manifest["params"]["program_bytes"]
        default_ptd = b.manifest["files"].get("default.ptd", {}).get("bytes", 0)  # the exported mixers and head
        want = plain_bytes if mode == "dense" else stored_bytes
        sizes[mode] = {"pte_bytes": pte, "default_ptd_bytes": default_ptd, "params_bytes": want,
                       "rel_diff": round((pte + default_ptd) / want - 1, 5),
                       "non_delegated_ops": b.manifest["non_delegated_ops"]}
    tasks_rec = {}
    if "swappable" in bundles:
        for t, r in bundles["swappable"].tasks.items():
            tasks_rec[t] = {"bytes": r["bytes"], "mixer_raw_bytes": r["mixer_file_raw_bytes"],
                            "ratio": round(r["bytes"] / r["mixer_file_raw_bytes"], 4),
                            "within_target": r["bytes"] <= (1 + TARGETS["task_rel"]) * r["mixer_file_raw_bytes"]
                            + TARGETS["task_slack_bytes"]}
    parity = {mode: b.manifest["parity"]["max_abs"] for mode, b in bundles.items()}
    agreement = real_agreement(sessions, model, eval_limit) if name == "embedded" and eval_limit else {}
    checks = {
        "dense_ratio": ratios.get("dense", 0) <= TARGETS["dense_ratio"],
        "swappable_ratio": ratios.get("swappable", 0) <= TARGETS["swappable_ratio"],
        "switch_forwards": ratios.get("switch_in_forwards", 0) <= TARGETS["switch_forwards"],
        "switch_from_file_forwards": ratios.get("switch_from_file_in_forwards", 0) <= TARGETS["switch_from_file_forwards"],
        "pte_dense": abs(sizes.get("dense", {}).get("rel_diff", 0)) <= TARGETS["pte_rel"],
        "pte_factored": abs(sizes.get("factored", {}).get("rel_diff", 0)) <= TARGETS["pte_rel"],
        "pte_swappable": abs(sizes.get("swappable", {}).get("rel_diff", 0)) <= TARGETS["pte_rel"],
        "task_ptd": all(t["within_target"] for t in tasks_rec.values()),
        "parity": all(v <= TARGETS["parity_atol"] for v in parity.values()),
        "top1_agreement": all(v >= TARGETS["top1_agreement"] for v in agreement.values()),
    }
    return {"model": name, "crisp_config": config.to_dict(), "input_shape": list(x.shape), "export_seconds": export_s,
            "plain_program_max_abs_vs_torch": plain_diff, "seconds": med, "ratios_to_plain": ratios, "sizes": sizes,
            "tasks": tasks_rec, "parity_max_abs": parity, "top1_agreement_fmnist": agreement,
            "eval_images": eval_limit if agreement else 0, "checks": checks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="embedded,embedded@16,vit_small", help="comma list of: embedded, vit_small, vit_base; model@B for batch B")
    ap.add_argument("--modes", default="dense,factored,swappable")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--eval-limit", type=int, default=2000, help="Fashion-MNIST test images for top-1 agreement")
    ap.add_argument("--quick", action="store_true", help="embedded model only, 5 rounds, 200 images (a smoke run)")
    ap.add_argument("--stock-fold", action="store_true",
                    help="also export the swappable bundle with set_task from stock operators only (as before "
                         "crisp::fold_) and time its switches in the same run")
    ap.add_argument("--out", default=None, help="default bench/results/executorch.json (executorch_quick.json with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.repeats, args.eval_limit = "embedded", 5, 200
    out_path = args.out or str(RESULTS_DIR / ("executorch_quick.json" if args.quick else "executorch.json"))
    modes = [m for m in args.modes.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="bench_et."))
    try:
        results = [bench_model(m, args.repeats, work, modes, args.eval_limit, args.stock_fold)
                   for m in args.models.split(",") if m]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import executorch.version

    out = write_json(out_path, {
        "schema": SCHEMA, "benchmark": "executorch", "quick": args.quick,
        "description": "ExecuTorch export modes (XNNPACK, fp32) vs the plain dense XNNPACK program of the same model, "
                       "interleaved in one run, batch 1 (B for model@B), 1 thread",
        "protocol": {"repeats": args.repeats, "warmup_rounds": 2, "statistic": "median", **SWITCH_PROTOCOL,
                     "switch": "set_task with the task's tensors already read (alternating two tasks); one call per "
                               "round, right after other cases (cold caches)",
                     "switch_from_file": "set_task('t1') right after os.utime on its .ptd (the session's verified copy "
                                         "is stale): read, SHA-256 against the manifest, parse and check (Python "
                                         "FlatTensor reader), then the set_task method; every call",
                     "verify_task_file": "the same file read, hashed, parsed and checked after the same os.utime, "
                                         "without set_task",
                     "reload_program": "load_program(bytes of the dense .pte) + load_method('forward')",
                     "stock_fold": "with --stock-fold: *_stock_fold cases time a second swappable bundle of the same "
                                   "model whose set_task uses stock operators only (one XNNPACK product a layer and "
                                   "a write-back copy, as before crisp::fold_), interleaved in the same rounds"},
        "targets": TARGETS, "executorch": executorch.version.__version__, "machine": machine_info(), "results": results,
    })
    print(f"\n{'model':<10} {'dense':>7} {'factored':>9} {'swap':>7} {'switch/fwd':>11} {'file switch':>12} "
          f"{'reload/fwd':>11} {'copy floor':>11} {'parity':>9}")
    for r in results:
        q = r["ratios_to_plain"]
        print(f"{r['model']:<10} {q.get('dense', 0):>7.3f} {q.get('factored', 0):>9.3f} {q.get('swappable', 0):>7.3f} "
              f"{q.get('switch_in_forwards', 0):>11.3f} {q.get('switch_from_file_in_forwards', 0):>12.3f} "
              f"{q.get('reload_program_in_forwards', 0):>11.2f} {q.get('copy_floor_in_forwards', 0):>11.3f} {max(r['parity_max_abs'].values()):>9.1e}")
        print(f"  sizes: {({k: (v['pte_bytes'], v.get('rel_diff')) for k, v in r['sizes'].items()})}")
        print(f"  tasks: {r['tasks']}  top-1 agreement: {r['top1_agreement_fmnist']}")
    print(f"wrote {out}")
    missed = [(r["model"], k) for r in results for k, ok in r["checks"].items() if not ok]
    for m, k in missed:
        print(f"MISSED target {k} on {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
