"""Benchmark: ways an ONNX Runtime fold graph can compute a CRISP group's dense weights, each in the layout
its forward product then reads, at ViT-S's shapes (full capacity: n = 4 layers a group, s = 4, r = 16),
1 thread; why ``export/onnx/fold.py`` computes a group's product transposed, splits it and transposes
each layer (issue 19: the ViT-S switch).

Per kind, CPU time (this thread's: ORT at 1 thread runs in the caller's) of one fold pass over one group
of each role (qkv 1152 x 384, proj 384 x 384, fc1 1536 x 384, fc2 384 x 1536; ``--groups`` of each,
ViT-S has 3), every output checked against numpy's ``B @ gate(A_i)``:

- ``shipped``: ``(n*s, r) @ B^T`` once a group (B read once, MLAS's wide kernel), ``Split`` into each
  layer's contiguous (s, u) rows, a 2-D ``Transpose`` each to (u, s) = W: the fold as exported;
- ``prepacked``: the same graph, its session free to pre-pack the constant bases once (the bundle's fold
  session is not: a second, always resident copy of them);
- ``narrow``: ``B @ gate(A_i)`` a layer, (u, r) @ (r, s), straight into W: no split, no transpose, but
  B is read n times and the product has s = 4 output columns;
- ``wide_cols``: ``B @ [gate(A_1) .. gate(A_n)]`` once, (u, n*s), then ``Split`` on the columns into each
  W (s numbers, 16 bytes, at a time);
- ``wt_split``: the product batched over W^T's row blocks, ``(n*s, r) @ B3`` with B3 (d_in/s, r, d_out),
  ``Split`` into each layer's W^T (d_in, d_out) in blocks of s * d_out: no transpose, but the forward
  must then read W^T.

``--crisp-kernel`` adds ``crisp_kernel_rowmajor`` and ``crisp_kernel_transposed``: crisp-edge's fused fold
(``export/kernels/fold_core.h`` through ``export/fold_kernel.py``) over the same groups, the basis (u, r) as
ExecuTorch programs hold it or (r, u) as the ONNX fold graph's data holds it (what ONNX Runtime's Python
session folds from).

``--crisp-quant`` adds ``crisp_quant_<f32|i8|i8_cm>_<role>`` (``_crisp_quant.py``): the kernel's fold fused with
per-channel int8 quantization (``fold_kernel.fold_quant_group``: a swappable int8 bundle's ONNX switch), the basis
stored transposed, float32, int8 codes (term scales in the mixers), or those codes channel-major.
``--kernels-only``: crisp-edge's kernels alone, no ONNX Runtime graphs.

``--fused-kernel`` adds ``fused_kernel``: ``bench/_fused_fold.c``, compiled here with ``cc`` (AVX-512), one
pass a group that reads B^T once and writes every layer's W, transposing in registers: what a fold costs
with a kernel neither runtime has as a stock operator (a probe; crisp-edge does not ship it).

The forward side (``forward_*``): every product a forward of 12 blocks runs (197 tokens), by the layout
its weight input has: ``W`` (``x @ Transpose(W)``, the exported graph, W packed per call) or ``Wt``
(``x @ Wt``). A fold layout is worth shipping only if its switch saving outweighs its forward cost.

    .venv/bin/python bench/bench_fold_layouts.py        # bench/results/fold_layouts.json
    .venv/bin/python bench/bench_fold_layouts.py --kernels-only --crisp-kernel --crisp-quant \
        --out bench/results/fold_quant_kernel.json [--baseline REV]
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import RESULTS_DIR, interleave, machine_info, pin_threads, summarize, write_json

THREADS = pin_threads(1)

import _crisp_quant  # noqa: E402 - after the thread pinning, as numpy
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

#: (role, d_out, d_in) of a ViT-S block's CRISP linears.
ROLES = (("qkv", 1152, 384), ("proj", 384, 384), ("fc1", 1536, 384), ("fc2", 384, 1536))
N, S, TOKENS, BLOCKS = 4, 4, 197, 12
R = N * S  # full capacity
FOLDS = ("shipped", "prepacked", "narrow", "wide_cols", "wt_split")


def _session(nodes: list, inits: list, inputs: list[str], outputs: list[str],
             prepack: bool = False) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.log_severity_level = 3
    if not prepack:  # as the bundle's fold session
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ints(values, name: str):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _group(kind: str, tag: str, basis: np.ndarray, d_out: int, d_in: int) -> tuple[list, list, list[str]]:
    """(nodes, initializers, outputs) of one group's fold of ``kind``; input ``{tag}.g``: the gated mixers (n, r, s)."""
    g, outs = f"{tag}.g", [f"{tag}.w{i}" for i in range(N)]
    if kind in ("shipped", "prepacked"):
        parts = [f"{tag}.p{i}" for i in range(N)]
        nodes = [helper.make_node("Transpose", [g], [f"{tag}.gt"], perm=[0, 2, 1]),
                 helper.make_node("Reshape", [f"{tag}.gt", f"{tag}.sr"], [f"{tag}.gall"]),
                 helper.make_node("MatMul", [f"{tag}.gall", f"{tag}.b"], [f"{tag}.all"]),
                 helper.make_node("Split", [f"{tag}.all"], parts, axis=0, num_outputs=N)]
        nodes += [helper.make_node("Transpose", [p], [o], perm=[1, 0]) for p, o in zip(parts, outs)]
        return nodes, [numpy_helper.from_array(np.ascontiguousarray(basis.T), f"{tag}.b"), _ints([N * S, R], f"{tag}.sr")], outs
    if kind == "narrow":
        parts = [f"{tag}.a{i}" for i in range(N)]
        nodes = [helper.make_node("Split", [g], parts, axis=0, num_outputs=N)]
        nodes += [n for i, (p, o) in enumerate(zip(parts, outs))
                  for n in (helper.make_node("Squeeze", [p, f"{tag}.zero"], [f"{tag}.m{i}"]),
                            helper.make_node("MatMul", [f"{tag}.b", f"{tag}.m{i}"], [o]))]
        return nodes, [numpy_helper.from_array(basis, f"{tag}.b"), _ints([0], f"{tag}.zero")], outs
    if kind == "wide_cols":
        nodes = [helper.make_node("Transpose", [g], [f"{tag}.gc"], perm=[1, 0, 2]),
                 helper.make_node("Reshape", [f"{tag}.gc", f"{tag}.rns"], [f"{tag}.gcat"]),
                 helper.make_node("MatMul", [f"{tag}.b", f"{tag}.gcat"], [f"{tag}.all"]),
                 helper.make_node("Split", [f"{tag}.all"], outs, axis=1, num_outputs=N)]
        return nodes, [numpy_helper.from_array(basis, f"{tag}.b"), _ints([R, N * S], f"{tag}.rns")], outs
    # wt_split: B3[c', t, o] = B[o * (d_in/s) + c', t]; output (d_in/s, n*s, d_out), layer i = columns block i
    b3 = np.ascontiguousarray(basis.reshape(d_out, d_in // S, R).transpose(1, 2, 0))
    nodes = [helper.make_node("Transpose", [g], [f"{tag}.gt"], perm=[0, 2, 1]),
             helper.make_node("Reshape", [f"{tag}.gt", f"{tag}.sr"], [f"{tag}.gall"]),
             helper.make_node("MatMul", [f"{tag}.gall", f"{tag}.b"], [f"{tag}.all"]),
             helper.make_node("Split", [f"{tag}.all"], outs, axis=1, num_outputs=N)]
    return nodes, [numpy_helper.from_array(b3, f"{tag}.b"), _ints([N * S, R], f"{tag}.sr")], outs


def _chain(nodes, start: str) -> list[tuple]:
    """(op type, attributes) of the nodes reachable from value ``start``, in graph order."""
    reached, out = {start}, []
    for node in nodes:
        if reached & set(node.input):
            reached |= set(node.output)
            out.append((node.op_type, sorted((a.name, tuple(a.ints) or a.i) for a in node.attribute)))
    return out


def shipped_is_exported() -> bool:
    """The ``shipped`` kind is the fold ``export/onnx/fold.py`` builds: the same nodes after the gate, in a toy
    timm ViT retrofitted with the benchmark's configuration (the default: s = 4, groups of 4, "pre")."""
    import crisp_edge as ce
    from crisp_edge.export.onnx.fold import build_fold_graph
    from crisp_edge.method.convert import crisp_bases
    from crisp_edge.testing import toy_timm_vit

    model = toy_timm_vit(depth=N)
    ce.retrofit_(model, ce.CrispConfig(), progress=False)
    key, basis = next(iter(crisp_bases(model).items()))
    assert (basis.s, len(basis.layer_names), basis.placement) == (S, N, "pre"), "the default configuration changed"
    proto, _ = build_fold_graph(model, 18)
    nodes, _, _ = _group("shipped", "probe", np.zeros((8, R), np.float32), 4, 8)
    return _chain(proto.graph.node, f"fold.{key}.gated") == _chain(nodes, "probe.g")


def _check(kind: str, got: np.ndarray, want: np.ndarray, d_out: int, d_in: int) -> None:
    """``got`` in ``kind``'s layout holds the dense weight ``want`` (d_out, d_in), to float32 rounding."""
    dense = got.reshape(d_in, d_out).T if kind == "wt_split" else got.reshape(d_out, d_in)
    if not np.allclose(dense, want, rtol=1e-4, atol=1e-4):
        sys.exit(f"{kind}: the fold's weights differ from the reference by {np.abs(dense - want).max():.3g}")


def fold_cases(groups: int, rng: np.random.Generator) -> dict:
    """``fold_<kind>_<role>`` -> one timed fold pass over ``groups`` groups of the role; outputs checked first."""
    cases = {}
    for role, d_out, d_in in ROLES:
        gated, ref, bases = {}, {}, {}
        for j in range(groups):
            tag = f"{role}{j}"
            bases[tag] = (rng.standard_normal((d_out * d_in // S, R)) / np.sqrt(R)).astype(np.float32)
            gated[f"{tag}.g"] = rng.standard_normal((N, R, S)).astype(np.float32)
            ref[tag] = [(bases[tag] @ gated[f"{tag}.g"][i]).reshape(d_out, d_in) for i in range(N)]
        for kind in FOLDS:
            nodes, inits, outs = [], [], []
            for tag, basis in bases.items():
                for acc, part in zip((nodes, inits, outs), _group(kind, tag, basis, d_out, d_in)):
                    acc.extend(part)
            sess = _session(nodes, inits, list(gated), outs, prepack=kind == "prepacked")
            got = dict(zip(outs, sess.run(outs, gated)))
            for tag in bases:
                for i in range(N):
                    _check(kind, got[f"{tag}.w{i}"], ref[tag][i], d_out, d_in)
            del got
            cases[f"fold_{kind}_{role}"] = _cpu_timer(lambda s=sess, o=outs, g=gated: s.run(o, g))
    return cases


def fused_kernel_case(groups: int, rng: np.random.Generator) -> dict:
    """``fold_fused_kernel`` -> one timed pass of ``_fused_fold.c`` over ``groups`` groups of each role (outputs
    written into arrays allocated once, as ONNX Runtime's arena reuses its own); checked against numpy first."""
    import ctypes
    import subprocess
    import tempfile
    from pathlib import Path

    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        sys.exit("--fused-kernel needs an AVX-512 CPU")
    src = Path(__file__).with_name("_fused_fold.c")
    with tempfile.TemporaryDirectory(prefix="fused_fold.") as tmp:  # the loaded library outlives its file
        lib_path = Path(tmp) / "libfused_fold.so"
        proc = subprocess.run(["cc", "-O3", "-mavx512f", "-mfma", "-shared", "-fPIC", str(src), "-o", str(lib_path)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"--fused-kernel: cc failed: {proc.stderr[-500:]}")
        lib = ctypes.CDLL(str(lib_path))
    lib.fold_group.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    calls = []
    for role, d_out, d_in in ROLES:
        for _ in range(groups):
            u = d_out * d_in // S
            bt = (rng.standard_normal((R, u)) / np.sqrt(R)).astype(np.float32)
            g = rng.standard_normal((N, R, S)).astype(np.float32)
            outs = [np.empty((u, S), np.float32) for _ in range(N)]
            calls.append((bt, g, outs, (ctypes.c_void_p * N)(*[o.ctypes.data for o in outs]), u))

    def run() -> None:
        for bt, g, _, ptrs, u in calls:
            lib.fold_group(bt.ctypes.data, g.ctypes.data, ptrs, u)
    run()
    for bt, g, outs, _, _ in calls:
        for i in range(N):
            _check("fused_kernel", outs[i], bt.T @ g[i], bt.shape[1], S)
    return {"fold_fused_kernel": _cpu_timer(run)}


def crisp_kernel_cases(groups: int, rng: np.random.Generator) -> dict:
    """``fold_crisp_kernel_<layout>`` -> one timed pass of crisp-edge's fold kernel over ``groups`` groups of each
    role, the basis row-major (u, r) or transposed (r, u) (outputs allocated once); checked against numpy first."""
    from crisp_edge.export import fold_kernel

    if fold_kernel.kernel() is None:
        sys.exit(f"--crisp-kernel: {fold_kernel.error()}")
    calls = []
    for role, d_out, d_in in ROLES:
        for _ in range(groups):
            basis = (rng.standard_normal((d_out * d_in // S, R)) / np.sqrt(R)).astype(np.float32)
            g = rng.standard_normal((N, R, S)).astype(np.float32)
            calls.append((basis, np.ascontiguousarray(basis.T), g, d_out, d_in))
    cases = {}
    for layout, transposed in (("rowmajor", False), ("transposed", True)):
        outs = [[np.empty((b.shape[0], S), np.float32) for _ in range(N)] for b, *_ in calls]

        def run(t=transposed, outs=outs) -> None:
            for (b, bt, g, _, _), o in zip(calls, outs):
                fold_kernel.fold_group(bt if t else b, g, t, o)
        run()
        for (b, _, g, d_out, d_in), o in zip(calls, outs):
            for i in range(N):
                _check(f"crisp_kernel_{layout}", o[i], (b @ g[i]).reshape(d_out, d_in), d_out, d_in)
        cases[f"fold_crisp_kernel_{layout}"] = _cpu_timer(run)
    return cases


def forward_cases(rng: np.random.Generator) -> dict:
    """``forward_<layout>_<role>``: the role's product in every one of 12 blocks (197 tokens), its weight an
    input in layout W or Wt."""
    cases = {}
    for role, d_out, d_in in ROLES:
        x = rng.standard_normal((1, TOKENS, d_in)).astype(np.float32)
        w = {f"w{b}": rng.standard_normal((d_out, d_in)).astype(np.float32) for b in range(BLOCKS)}
        nodes = {"W": [n for k in w for n in (helper.make_node("Transpose", [k], [f"{k}.t"], perm=[1, 0]),
                                                helper.make_node("MatMul", ["x", f"{k}.t"], [f"{k}.y"]))],
                 "Wt": [helper.make_node("MatMul", ["x", k], [f"{k}.y"]) for k in w]}
        feeds = {"W": {"x": x, **w}, "Wt": {"x": x, **{k: np.ascontiguousarray(v.T) for k, v in w.items()}}}
        outs = [f"{k}.y" for k in w]
        sessions = {layout: _session(nodes[layout], [], list(feeds[layout]), outs) for layout in nodes}
        a, b = (sessions[k].run(outs, feeds[k]) for k in ("W", "Wt"))
        if not all(np.allclose(p, q, rtol=1e-3, atol=1e-3) for p, q in zip(a, b)):
            sys.exit(f"{role}: the two forward layouts give different products")
        cases.update({f"forward_{k}_{role}": _cpu_timer(lambda s=sess, f=feeds[k], o=outs: s.run(o, f))
                      for k, sess in sessions.items()})
    return cases


def _cpu_timer(fn):
    def case() -> float:
        start = time.thread_time()
        fn()
        return time.thread_time() - start
    return case


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=3, help="groups of each role (ViT-S: 3)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="one group of each role, 3 rounds, no forward side")
    ap.add_argument("--executorch", action="store_true",
                    help="also ExecuTorch set_task methods, one group of each role (bench/_set_task_layouts.py)")
    ap.add_argument("--crisp-kernel", action="store_true",
                    help="also crisp-edge's fold kernel (export/fold_kernel.py), the basis in either layout")
    ap.add_argument("--crisp-quant", action="store_true", help="also the kernel's fold + int8 quantization")
    ap.add_argument("--kernels-only", action="store_true",
                    help="only crisp-edge's kernels (--crisp-kernel, --crisp-quant): no ONNX Runtime graphs")
    ap.add_argument("--fused-kernel", action="store_true", help="also bench/_fused_fold.c (needs cc and AVX-512)")
    ap.add_argument("--baseline", metavar="REV",
                    help="with --crisp-quant: also the channel-major fold+quantize built from git revision REV")
    ap.add_argument("--out", default=str(RESULTS_DIR / "fold_layouts.json"))
    args = ap.parse_args(argv)
    if args.baseline and not args.crisp_quant:
        ap.error("--baseline times the kernel's fold + quantization: give --crisp-quant too")
    if args.kernels_only and args.fused_kernel:
        ap.error("--fused-kernel is compared with the ONNX Runtime graphs, which --kernels-only leaves out")
    groups, repeats = (1, 3) if args.quick else (args.groups, args.repeats)
    rng = np.random.default_rng(0)
    cases = {} if args.kernels_only else fold_cases(groups, rng)
    if not args.quick and not args.kernels_only:
        cases.update(forward_cases(rng))
    if args.fused_kernel:
        cases.update(fused_kernel_case(groups, rng))
    if args.crisp_kernel:
        cases.update(crisp_kernel_cases(groups, rng))
    if args.crisp_quant:
        baseline = _crisp_quant.baseline_library(args.baseline) if args.baseline else None
        cases.update(_crisp_quant.crisp_quant_cases(groups, rng, ROLES, N, R, S, _cpu_timer, baseline))
    if args.executorch:
        from _set_task_layouts import executorch_cases
        cases.update(executorch_cases(ROLES, N, S, R))
    interleave(cases, 1)  # warm-up
    med = {k: summarize(v) for k, v in interleave(cases, repeats).items()}
    roles = [r for r, _, _ in ROLES]

    def total(prefix: str) -> float:
        return sum(med[f"{prefix}_{r}"]["median"] for r in roles)

    result = {"groups_per_role": groups, "layers_per_group": N, "s": S, "r": R, "seconds": med}
    if not args.kernels_only:
        result.update({"shipped_is_exported": shipped_is_exported(),
                       "fold_seconds": {k: round(total(f"fold_{k}"), 7) for k in FOLDS},
                       "fold_vs_shipped": {k: round(total(f"fold_{k}") / total("fold_shipped"), 4) for k in FOLDS},
                       "fold_vs_shipped_by_role": {r: {k: round(med[f"fold_{k}_{r}"]["median"] /
                                                                med[f"fold_shipped_{r}"]["median"], 4) for k in FOLDS}
                                                   for r in roles}})
    if not args.quick and not args.kernels_only:
        result["forward_Wt_vs_W"] = round(total("forward_Wt") / total("forward_W"), 4)
        result["forward_Wt_vs_W_by_role"] = {r: round(med[f"forward_Wt_{r}"]["median"] / med[f"forward_W_{r}"]["median"], 4)
                                             for r in roles}
    if args.fused_kernel:
        result["fused_kernel_vs_shipped"] = round(med["fold_fused_kernel"]["median"] / total("fold_shipped"), 4)
        result["fused_kernel_seconds"] = med["fold_fused_kernel"]["median"]
    if args.crisp_kernel:
        result["crisp_kernel_seconds"] = {k: med[f"fold_crisp_kernel_{k}"]["median"] for k in ("rowmajor", "transposed")}
        if not args.kernels_only:
            result["crisp_kernel_vs_shipped"] = {k: round(v / total("fold_shipped"), 4)
                                                 for k, v in result["crisp_kernel_seconds"].items()}
    if args.crisp_quant:
        result.update(_crisp_quant.summarize(med, roles))
    if args.executorch:
        narrow = med["set_task_narrow"]["median"]
        result["executorch_set_task_vs_narrow"] = {k[len("set_task_"):]: round(v["median"] / narrow, 4)
                                                   for k, v in med.items() if k.startswith("set_task_")}
    out = write_json(args.out, {
        "schema": 1, "benchmark": "fold_layouts",
        "description": "ONNX Runtime fold graphs of CRISP groups at ViT-S's shapes, each writing the layout its "
                       "forward product reads, and the forward products by that layout; CPU time, 1 thread",
        "protocol": {"repeats": repeats, "warmup_rounds": 1, "statistic": "median", "clock": "time.thread_time",
                     "fold": "one run of a graph holding every group's fold (outputs checked against numpy first)",
                     "forward": f"every CRISP product of {BLOCKS} ViT-S blocks at {TOKENS} tokens, batch 1",
                     "set_task": "--executorch: one ExecuTorch set_task call writing one group of each role",
                     "crisp_quant": "--crisp-quant: one fold_quant_group call per group, outputs written in place",
                     "baseline": args.baseline},
        "onnxruntime": ort.__version__, "onnx": onnx.__version__, "machine": machine_info(), "results": [result],
    })
    if not args.kernels_only:
        print(f"{'role':<6}" + "".join(f"{k:>11}" for k in FOLDS) + "   (fold, ms)" + ("   forward W / Wt, ms" if not args.quick else ""))
        for r in roles:
            line = f"{r:<6}" + "".join(f"{1e3 * med[f'fold_{k}_{r}']['median']:>11.2f}" for k in FOLDS)
            if not args.quick:
                line += f"   {1e3 * med[f'forward_W_{r}']['median']:8.2f} / {1e3 * med[f'forward_Wt_{r}']['median']:.2f}"
            print(line)
        print("fold vs shipped:", result["fold_vs_shipped"])
    if args.fused_kernel:
        print(f"fused kernel: {1e3 * result['fused_kernel_seconds']:.2f} ms, {result['fused_kernel_vs_shipped']:.3f}x shipped")
    if args.crisp_kernel:
        print("crisp-edge kernel, ms:", {k: round(1e3 * v, 2) for k, v in result["crisp_kernel_seconds"].items()})
    if args.crisp_quant:
        print("fold_quant_group, ms (float32 / int8 / int8 channel-major basis):",
              {r: tuple(round(1e3 * result["crisp_quant_seconds"][k][r], 3) for k in _crisp_quant.KINDS) for r in roles})
        if args.baseline:
            print(f"channel-major, this build against {args.baseline}'s:", result["crisp_quant_i8_cm_vs_baseline"],
                  "all groups", result["crisp_quant_i8_cm_vs_baseline_all_groups"])
    if args.executorch:
        print("ExecuTorch set_task vs narrow:", result["executorch_set_task_vs_narrow"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
