"""Benchmark: int8 bundles against float32 bundles of the same model, in both runtimes.

For each model (the embedded ViT; ViT-S at 224x224 with the project's CRISP config, random weights:
no pretrained ViT-S is reachable offline) and each runtime (ONNX Runtime, ExecuTorch XNNPACK), the CRISP
model is exported ``dense`` in float32 and with ``quantize="int8"`` and the two are compared side by side
in one run, 1 thread, batch 1, interleaved rounds (forwards in steady state):

* bytes: the int8 bundle's weights (ONNX initializers; the ExecuTorch program) over float32's;
* latency: int8 forward over float32 forward;
* accuracy (embedded ViT, real Fashion-MNIST test images): top-1 of each bundle, the drop, and top-1
  agreement of int8 with float32; ViT-S: the parity max |diff| on the stored reference inputs only.

ExecuTorch's swappable int8 bundle (crisp::qlinear over int8 buffers set_task writes) is timed in the same
interleaved run: its forward over the int8 dense program's, a task switch from the file in int8 forwards, and
on the embedded ViT its accuracy. Where a runtime refuses swappable int8 (``crisp_edge.export.quantize`` says
why), what it would cost is measured here too (``_swap_int8.py``): ONNX Runtime's int8 graph with
its weights as inputs (what a switchable int8 forward runs), the least an int8 switch costs (a float32
fold + per-channel requantization), and reloading a dense int8 model per task in both runtimes; goals:
swappable int8 <= 1.10x int8 dense, switch <= 0.5 int8 forwards. Writes ``bench/results/quantize.json``.

    .venv/bin/python bench/bench_quantize.py [--models embedded vit_small] [--repeats 30] [--eval-limit 2000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import RESULTS_DIR, interleave, load_bench_model, machine_info, pin_threads, steady, summarize, write_json

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
    return out, export_onnx(model, work / f"{name}_onnx_swap", mode="swappable", example_input=x)


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


def bench_model(name: str, repeats: int, work: Path, eval_limit: int) -> dict:
    _, model, config, x = load_bench_model(name)
    print(f"{name}: exporting float32 and int8 bundles for both runtimes", flush=True)
    bundles, float_swap = exports(model, x, work, name)
    sessions = {k: b.session(threads=1) for k, b in bundles.items()}
    xn = {rt: x.numpy() if rt == "onnxruntime" else x for rt in ("onnxruntime", "executorch")}
    cases = {f"{rt}/{p}": steady(lambda s=s, rt=rt: s(xn[rt])) for (rt, p), s in sessions.items()}
    alternatives = {**_swap_int8.onnx_cases(bundles[("onnxruntime", "int8")], float_swap, xn["onnxruntime"], work,
                                            lambda: session_options(1)),
                    **_swap_int8.executorch_cases(bundles[("executorch", "int8")])}
    et_swap, et_swap_session, et_swap_cases = _swap_int8.executorch_swappable(model, x, work, name)
    alternatives.update(et_swap_cases)
    keep = alternatives.pop("_keep")  # noqa: F841 - the sessions the cases use stay alive meanwhile
    cases.update(alternatives)
    print(f"{name}: timing {repeats} rounds", flush=True)
    interleave(cases, 2)
    med = {k: summarize(v) for k, v in interleave(cases, repeats).items()}
    result = {"model": name, "crisp_config": config.to_dict(), "input_shape": list(x.shape), "seconds": med,
              "runtimes": {}, "swappable_int8": _swap_int8.summarize(med, TARGETS)}
    print(f"{name} swappable int8 alternatives: {result['swappable_int8']}", flush=True)
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
    et_sw = result["swappable_int8"]["executorch"]
    et_sw["parity_max_abs"] = et_swap.manifest["parity"]["max_abs"]
    if accuracy_data is not None:  # the swappable int8 bundle on its own task (the embedded ViT's head)
        et_swap_session.set_task("default")
        xs, ys = accuracy_data
        p8 = top1(et_swap_session, xs, int(x.shape[0]))
        p32 = top1(sessions[("executorch", "float32")], xs, int(x.shape[0]))
        et_sw.update({"top1_int8": round(100 * float((p8 == ys.numpy()).mean()), 2),
                      "top1_drop_points": round(result["runtimes"]["executorch"]["top1_float32"]
                                                - 100 * float((p8 == ys.numpy()).mean()), 2),
                      "agreement_vs_float32": round(float((p8 == p32).mean()), 4)})
    print(f"{name} executorch swappable int8: {et_sw}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["embedded", "vit_small"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--eval-limit", type=int, default=2000, help="Fashion-MNIST test images for the embedded ViT")
    p.add_argument("--out", default=str(RESULTS_DIR / "quantize.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(m, args.repeats, Path(tmp), args.eval_limit) for m in args.models]
    data = {"schema": SCHEMA, "benchmark": "quantize", "machine": machine_info(), "threads": THREADS,
            "targets": TARGETS, "protocol": {"batch": 1, "mode": "dense", "scheme": "int8",
                                             "forwards": "steady state, interleaved rounds, median",
                                             "swappable_int8": _swap_int8.__doc__.split("\n\n", 1)[1].strip()},
            "models": results}
    write_json(args.out, data)
    ok = all(all(r["checks"].values()) for m in results for r in m["runtimes"].values())
    print(f"wrote {args.out}; every target met: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
