"""Benchmark: int8 bundles against float32 bundles of the same model, in both runtimes.

For each model (the embedded ViT; ViT-S at 224x224 with the project's CRISP config, random weights:
no pretrained ViT-S is reachable offline) and each runtime (ONNX Runtime, ExecuTorch XNNPACK), the CRISP
model is exported ``dense`` in float32 and with ``quantize="int8"`` and the two are compared side by side
in one run, 1 thread, batch 1, interleaved rounds (forwards in steady state):

* bytes: the int8 bundle's weights (ONNX initializers; the ExecuTorch program) over float32's;
* latency: int8 forward over float32 forward;
* accuracy (embedded ViT, real Fashion-MNIST test images): top-1 of each bundle, the drop, and top-1
  agreement of int8 with float32; ViT-S: the parity max |diff| on the stored reference inputs only.

Swappable int8 is measured in the same interleaved run (``_swap_int8.py``), for both runtimes: its forward
against the int8 dense bundle's, a task switch from the task file (as a user pays it: read, verified, folded,
quantized) in int8 dense forwards, and reloading a dense int8 model per task; ONNX Runtime also a switch alone and
the fold graph's switch (an app running ONNX Runtime alone); its bytes and (embedded ViT) accuracy as the dense int8
bundle's. Goals: swappable int8 <= 1.10x int8 dense, switch <= 0.5 int8 forwards. ``--lock PATH``: hold an
exclusive ``flock`` on PATH while timing (exports and accuracy run outside it). Writes
``bench/results/quantize.json``.

    .venv/bin/python bench/bench_quantize.py [--models embedded vit_small] [--repeats 30] [--eval-limit 2000]
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import sys
import tempfile
from pathlib import Path

from _common import RESULTS_DIR, bench_task, interleave, load_bench_model, machine_info, pin_threads, steady, summarize, write_json

THREADS = pin_threads(1)

import _swap_int8  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from crisp_edge.export import export_executorch, export_onnx  # noqa: E402
from crisp_edge.export.onnx.session import session_options  # noqa: E402

SCHEMA = 1
TARGETS = {"bytes_ratio": 0.27, "top1_drop_points": 0.5, "top1_agreement": 0.99, "latency_ratio": 0.6,
           "swappable_ratio": 1.10, "switch_forwards": 0.5}


def exports(model, x, work: Path, name: str) -> dict:
    out = {}
    for precision, q in (("float32", None), ("int8", "int8")):
        out[("onnxruntime", precision)] = export_onnx(model, work / f"{name}_onnx_{precision}", mode="dense",
                                                      example_input=x, quantize=q)
        out[("executorch", precision)] = export_executorch(model, work / f"{name}_et_{precision}", mode="dense",
                                                           example_input=x, quantize=q)
    tasks = [bench_task(model, work / f"{name}_t{i}.safetensors", f"t{i}", i) for i in (1, 2)]
    return out, export_onnx(model, work / f"{name}_onnx_swap_int8", mode="swappable", example_input=x,
                            quantize="int8", tasks=tasks)


@contextlib.contextmanager
def held(lock: str | None):
    """An exclusive flock on ``lock`` (None: nothing) for the timed part."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def bundle_bytes(bundle) -> int:
    return bundle.manifest["params"].get("weights_bytes") or bundle.manifest["params"]["program_bytes"]


def top1(session, xs: torch.Tensor, batch: int) -> np.ndarray:
    """Predicted classes over ``xs`` in chunks of the session's batch (ExecuTorch programs are static)."""
    preds = []
    for i in range(0, len(xs), batch):
        chunk = xs[i:i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = torch.cat([chunk, chunk[:1].expand(pad, *chunk.shape[1:])])
        logits = np.asarray(session(chunk.numpy() if session_is_onnx(session) else chunk))
        preds.append(logits[:batch - pad].argmax(-1))
    return np.concatenate(preds)


def session_is_onnx(session) -> bool:
    return type(session).__name__ == "OnnxCrispSession"


def _swappable_accuracy(sess, float_sess, accuracy_data, batch: int) -> dict:
    """Top-1 of a swappable int8 session against the float32 dense one on the same images, and its goals."""
    xs, ys = accuracy_data
    p32, p8 = top1(float_sess, xs, batch), top1(sess, xs, batch)
    y = ys.numpy()
    r = {"eval_images": len(y), "top1_float32": round(100 * float((p32 == y).mean()), 2),
         "top1_swappable_int8": round(100 * float((p8 == y).mean()), 2), "agreement": round(float((p8 == p32).mean()), 4)}
    r["top1_drop_points"] = round(r["top1_float32"] - r["top1_swappable_int8"], 2)
    r["meets_accuracy"] = {"top1_drop": r["top1_drop_points"] <= TARGETS["top1_drop_points"],
                           "agreement": r["agreement"] >= TARGETS["top1_agreement"]}
    return r


def bench_model(name: str, repeats: int, work: Path, eval_limit: int, lock: str | None = None) -> dict:
    _, model, config, x = load_bench_model(name)
    print(f"{name}: exporting float32 and int8 bundles for both runtimes, and a swappable int8 ONNX bundle", flush=True)
    bundles, swap_int8 = exports(model, x, work, name)
    sessions = {k: b.session(threads=1) for k, b in bundles.items()}
    xn = {rt: x.numpy() if rt == "onnxruntime" else x for rt in ("onnxruntime", "executorch")}
    cases = {f"{rt}/{p}": steady(lambda s=s, rt=rt: s(xn[rt])) for (rt, p), s in sessions.items()}
    alternatives = {**_swap_int8.onnx_cases(bundles[("onnxruntime", "int8")], swap_int8, xn["onnxruntime"],
                                            lambda: session_options(1)),
                    **_swap_int8.executorch_cases(bundles[("executorch", "int8")])}
    et_swap, et_swap_session, et_swap_cases = _swap_int8.executorch_swappable(model, x, work, name)
    alternatives.update(et_swap_cases)
    keep = alternatives.pop("_keep")
    cases.update(alternatives)
    print(f"{name}: timing {repeats} rounds", flush=True)
    with held(lock):
        interleave(cases, 2)
        med = {k: summarize(v) for k, v in interleave(cases, repeats).items()}
    result = {"model": name, "crisp_config": config.to_dict(), "input_shape": list(x.shape), "seconds": med,
              "runtimes": {}, "swappable_int8": _swap_int8.summarize(med, TARGETS),
              "arithmetic": _swap_int8.arithmetic(model, x)}
    accuracy_data = None
    if name == "embedded":
        from crisp_edge.data.fashion_mnist import load_fashion_mnist

        accuracy_data = load_fashion_mnist("test", limit=eval_limit)
    for rt in ("onnxruntime", "executorch"):
        f32, i8 = bundles[(rt, "float32")], bundles[(rt, "int8")]
        r = {"bytes_float32": bundle_bytes(f32), "bytes_int8": bundle_bytes(i8),
             "bytes_ratio": round(bundle_bytes(i8) / bundle_bytes(f32), 4),
             "latency_ratio": round(med[f"{rt}/int8"]["median"] / med[f"{rt}/float32"]["median"], 4),
             "parity_max_abs_int8": i8.manifest["parity"]["max_abs"],
             "tolerance_int8": i8.manifest["tolerance"]}
        if accuracy_data is not None:
            xs, ys = accuracy_data
            batch = int(x.shape[0])
            p32, p8 = top1(sessions[(rt, "float32")], xs, batch), top1(sessions[(rt, "int8")], xs, batch)
            y = ys.numpy()
            r.update({"eval_images": len(y), "top1_float32": round(100 * float((p32 == y).mean()), 2),
                      "top1_int8": round(100 * float((p8 == y).mean()), 2),
                      "agreement": round(float((p8 == p32).mean()), 4)})
            r["top1_drop_points"] = round(r["top1_float32"] - r["top1_int8"], 2)
        r["checks"] = {"bytes_ratio": r["bytes_ratio"] <= TARGETS["bytes_ratio"],
                       "latency_ratio": r["latency_ratio"] <= TARGETS["latency_ratio"]}
        if "agreement" in r:
            r["checks"].update({"top1_drop": r["top1_drop_points"] <= TARGETS["top1_drop_points"],
                                "agreement": r["agreement"] >= TARGETS["top1_agreement"]})
        result["runtimes"][rt] = r
        print(f"{name} {rt}: {r}", flush=True)
    o = result["swappable_int8"]["onnxruntime"]
    o.update({"bytes_swappable_int8": bundle_bytes(swap_int8),
              "bytes_ratio_to_float32_dense": round(bundle_bytes(swap_int8) / bundle_bytes(bundles[("onnxruntime", "float32")]), 4),
              "parity_max_abs": swap_int8.manifest["parity"]["max_abs"], "tolerance": swap_int8.manifest["tolerance"]})
    e = result["swappable_int8"]["executorch"]
    e.update({"bytes_swappable_int8": bundle_bytes(et_swap),
              "bytes_ratio_to_float32_dense": round(bundle_bytes(et_swap) / bundle_bytes(bundles[("executorch", "float32")]), 4),
              "parity_max_abs": et_swap.manifest["parity"]["max_abs"], "tolerance": et_swap.manifest["tolerance"]})
    if accuracy_data is not None:  # each swappable int8 bundle on the exported model's own mixers ("default")
        for rt, rec, sess in (("onnxruntime", o, keep[0]), ("executorch", e, et_swap_session)):
            sess.set_task("default")
            acc = _swappable_accuracy(sess, sessions[(rt, "float32")], accuracy_data, int(x.shape[0]))
            rec["meets"].update(acc.pop("meets_accuracy"))
            rec.update(acc)
    print(f"{name} swappable int8: {result['swappable_int8']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["embedded", "vit_small"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--eval-limit", type=int, default=2000, help="Fashion-MNIST test images for the embedded ViT")
    p.add_argument("--out", default=str(RESULTS_DIR / "quantize.json"))
    p.add_argument("--lock", default=None, help="a file to flock exclusively while timing (e.g. a shared machine's)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(m, args.repeats, Path(tmp), args.eval_limit, args.lock) for m in args.models]
    data = {"schema": SCHEMA, "benchmark": "quantize", "machine": machine_info(), "threads": THREADS,
            "targets": TARGETS, "protocol": {"batch": 1, "mode": "dense", "scheme": "int8",
                                             "forwards": "steady state, interleaved rounds, median",
                                             "swappable_int8": _swap_int8.__doc__.split("\n\n", 1)[1].strip()},
            "models": results}
    write_json(args.out, data)
    ok = all(all(r["checks"].values()) for m in results for r in m["runtimes"].values())
    missed = [f"{m['model']}/{rt}/{goal}" for m in results for rt, r in m.get("swappable_int8", {}).items()
              for goal, met in r.get("meets", {}).items() if not met]
    print(f"wrote {args.out}; dense int8 targets met: {ok}; swappable int8 goals missed: {', '.join(missed) or 'none'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
