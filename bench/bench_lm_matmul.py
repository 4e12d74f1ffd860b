"""Benchmark: ONNX Runtime's CPU products by a weight that is a graph *input* (a swappable bundle's task
weights) against the same weight as a constant initializer (a dense bundle's: pre-packed at session
creation), at SmolLM2-135M's projection shapes, 1 thread; why ``export/onnx/lm_paths.py`` gives prefill and
decode different paths.

Each graph holds every projection of ``--layers`` SmolLM2 blocks (q, k, v, o, gate, up, down: 7 distinct
weights a block; 30 blocks = SmolLM2's 424 MB, so the weights stream from memory as in the model) applied
to one activation; per product kind, CPU time (this thread's: ORT at 1 thread runs in the caller's) of
one pass, for 1 token (decode) and ``--tokens`` tokens (prefill), interleaved rounds, ratio const / kind:

- ``const``: ``x @ Transpose(W)`` with W an initializer: folded and pre-packed (the dense bundle);
- ``transB``: the same with W an input: ``FusedMatMul(transB)``, B packed per call (the exported graph);
- ``noT``: ``x @ Wt`` with Wt (d_in, d_out) an input (a transposed CRISP group's layout);
- ``flip``: ``Transpose(W @ Transpose(x))`` with W an input: W is MLAS's A operand, read in place
  (the swappable prefill path).

    .venv/bin/python bench/bench_lm_matmul.py            # bench/results/lm_matmul.json
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import RESULTS_DIR, interleave, machine_info, pin_threads, write_json

THREADS = pin_threads(1)

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, INTER, KV = 576, 1536, 192
#: (name, d_out, d_in) of a SmolLM2 block's projections.
PROJ = (("q", HIDDEN, HIDDEN), ("k", KV, HIDDEN), ("v", KV, HIDDEN), ("o", HIDDEN, HIDDEN),
        ("gate", INTER, HIDDEN), ("up", INTER, HIDDEN), ("down", HIDDEN, INTER))
KINDS = ("const", "transB", "noT", "flip")


def graph(kind: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Every weight applied to the input of its width (``x576`` or ``x1536``, (1, tokens, d_in))."""
    nodes, inits, outs = [], [], []
    ins = [helper.make_tensor_value_info(f"x{d}", TensorProto.FLOAT, [1, "t", d]) for d in (HIDDEN, INTER)]
    for d in (HIDDEN, INTER):
        nodes.append(helper.make_node("Transpose", [f"x{d}"], [f"x{d}t"], perm=[0, 2, 1]))
    for name, w in weights.items():
        d_out, d_in = w.shape
        x, y = f"x{d_in}", f"y.{name}"
        if kind == "const":
            inits.append(numpy_helper.from_array(w, name))
        if kind in ("const", "transB"):
            nodes += [helper.make_node("Transpose", [name], [f"{name}.t"], perm=[1, 0]),
                      helper.make_node("MatMul", [x, f"{name}.t"], [y])]
        elif kind == "noT":
            nodes.append(helper.make_node("MatMul", [x, name], [y]))
        else:
            nodes += [helper.make_node("MatMul", [name, f"{x}t"], [f"{y}.t"]),
                      helper.make_node("Transpose", [f"{y}.t"], [y], perm=[0, 2, 1])]
        if kind != "const":
            shape = [d_in, d_out] if kind == "noT" else [d_out, d_in]
            ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, kind, ins, outs, inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="SmolLM2 blocks of weights (default 30: all of SmolLM2's)")
    ap.add_argument("--tokens", type=int, default=64, help="prefill tokens (default 64)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(RESULTS_DIR / "lm_matmul.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    weights = {f"{name}{i}": (rng.standard_normal((o, d), dtype=np.float32) * 0.02)
               for i in range(args.layers) for name, o, d in PROJ}
    values = {n: ort.OrtValue.ortvalue_from_numpy(w) for n, w in weights.items()}
    transposed = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w.T)) for n, w in weights.items()}
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = THREADS, 1, 3
    cpu: dict[str, list[float]] = {}

    def case(kind: str, tokens: int):
        sess = ort.InferenceSession(graph(kind, weights).SerializeToString(), so)
        binding = sess.io_binding()
        if kind != "const":
            for n in weights:
                binding.bind_ortvalue_input(n, (transposed if kind == "noT" else values)[n])
        for d in (HIDDEN, INTER):
            binding.bind_cpu_input(f"x{d}", rng.standard_normal((1, tokens, d), dtype=np.float32))
        for o in sess.get_outputs():
            binding.bind_output(o.name, "cpu")
        sess.run_with_iobinding(binding)  # warm-up

        def run() -> float:
            c, w = time.thread_time(), time.perf_counter()
            sess.run_with_iobinding(binding)
            cpu.setdefault(f"{kind}_{tokens}", []).append(time.thread_time() - c)
            return time.perf_counter() - w
        return run

    cases = {f"{k}_{t}": case(k, t) for t in (1, args.tokens) for k in KINDS}
    wall = interleave(cases, args.repeats)
    med = {k: float(np.median(v)) for k, v in cpu.items()}
    result = {"benchmark": "lm_matmul", "threads": THREADS, "layers": args.layers, "tokens": args.tokens,
              "weights_mb": round(sum(w.nbytes for w in weights.values()) / 2 ** 20, 1), "machine": machine_info(),
              "cpu_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
              "wall_ms": {k: round(float(np.median(v)) * 1e3, 2) for k, v in wall.items()},
              "ratio_const_over": {t: {k: round(med[f"const_{tok}"] / med[f"{k}_{tok}"], 3) for k in KINDS}
                                   for t, tok in (("decode", 1), ("prefill", args.tokens))}}
    write_json(args.out, result)
    print(result["ratio_const_over"], result["cpu_ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
