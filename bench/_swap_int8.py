"""Measured alternatives to a swappable int8 bundle, for ``bench_quantize.py`` (issue 19).

A swappable int8 bundle would run the integer kernels on weights that change at every task switch. Each
runtime's case is measured here as the cases of one interleaved run, against the int8 dense bundle:

ONNX Runtime
  * ``int8_weights_as_inputs``: the int8 dense graph (``quantize_dynamic``: DynamicQuantizeLinear ->
    MatMulInteger) with every int8 weight and its per-channel scale turned from an initializer into a
    graph input, fed once through an IOBinding: the forward a swappable int8 bundle would run (MatMulInteger
    cannot pre-pack a weight that is an input), against the unchanged int8 graph run the same way
    (``int8_bound``).
  * ``float32_fold``: one fold run of a float32 swappable bundle of the same model (``set_task("default")``),
    and ``requantize``: per-channel symmetric quantization of as many float weights to int8 in ORT
    (row max of |W| in the fold's (d_out, d_in) layout -> scale -> QuantizeLinear per row -> the int8
    transpose MatMulInteger takes): together the least an int8 task switch costs
    (the fold must produce float W before it can be quantized per output channel).
  * ``reload_int8``: creating a session on the int8 dense model file (a dense int8 model per task).

ExecuTorch
  * ``reload_int8``: ``load_program`` + ``load_method("forward")`` of the int8 dense program (XNNPACK packs
    its int8 weights at load). XNNPACK's partitioner counts a buffer as a static weight
    (``backends/xnnpack/utils/utils.py``: ``is_param_node``) and packs it once, at load, so the swappable int8
    bundle runs crisp-edge's own int8 linear instead (``crisp::qlinear`` over buffers ``set_task`` writes with
    ``crisp::fold_quant_``, ``export/executorch/custom_ops.py``).
  * ``swappable_int8``: that bundle's forward (steady state), against the int8 dense program's.
  * ``switch_int8_from_file``: its ``set_task(path)`` of a task file, as a user pays it (reading and verifying
    the ``.ptd``, then the fold + quantize), alternating two tasks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _common import steady, timed
from onnx import TensorProto, helper, numpy_helper


def _as_inputs(graph_path: Path, out: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The int8 graph with each MatMulInteger weight and its scale as graph inputs, and their values."""
    proto = onnx.load(str(graph_path))
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    names = []
    for node in g.node:
        if node.op_type == "MatMulInteger" and node.input[1] in inits:
            w = node.input[1]
            names += [w, w.removesuffix("_quantized") + "_scale"]
    values = {n: numpy_helper.to_array(inits[n]) for n in names if n in inits}
    kept = [t for t in g.initializer if t.name not in values]
    del g.initializer[:]
    g.initializer.extend(kept)
    for n, a in values.items():
        elem = TensorProto.INT8 if a.dtype == np.int8 else TensorProto.FLOAT
        g.input.append(helper.make_tensor_value_info(n, elem, list(a.shape)))
    onnx.save(proto, str(out))
    return out, values


def _requantize_graph(shapes: list[list[int]]) -> bytes:
    """Float weights in the fold's layout, (d_out, d_in) row-major, in -> MatMulInteger's int8 (d_in, d_out)
    weights and per-output-channel scales out: a row max over contiguous values, QuantizeLinear with one
    scale per row, then the int8 transpose MatMulInteger needs (it has no transB)."""
    nodes, inputs, outputs = [], [], []
    inits = [numpy_helper.from_array(np.array(1 / 127, np.float32), "inv127"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    for i, (d_in, d_out) in enumerate(shapes):
        w, zp = f"w{i}", f"zp{i}"
        inits.append(numpy_helper.from_array(np.zeros(d_out, np.int8), zp))
        inputs.append(helper.make_tensor_value_info(w, TensorProto.FLOAT, [d_out, d_in]))
        nodes += [helper.make_node("Abs", [w], [f"a{i}"]),
                  helper.make_node("ReduceMax", [f"a{i}", "axis1"], [f"m{i}"], keepdims=0),
                  helper.make_node("Mul", [f"m{i}", "inv127"], [f"s{i}"]),
                  helper.make_node("QuantizeLinear", [w, f"s{i}", zp], [f"qt{i}"], axis=0),
                  helper.make_node("Transpose", [f"qt{i}"], [f"q{i}"], perm=[1, 0])]
        outputs += [helper.make_tensor_value_info(f"q{i}", TensorProto.INT8, [d_in, d_out]),
                    helper.make_tensor_value_info(f"s{i}", TensorProto.FLOAT, [d_out])]
    proto = helper.make_model(helper.make_graph(nodes, "requantize", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    return proto.SerializeToString()


def onnx_cases(int8_bundle, float_swappable, x: np.ndarray, work: Path, options) -> dict:
    """The timed cases (name -> case) of the ONNX Runtime alternatives."""
    graph = int8_bundle.file("model.onnx")
    path, values = _as_inputs(graph, work / "int8_weights_as_inputs.onnx")
    sess = ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
    held = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in values.items()}
    dense = ort.InferenceSession(str(graph), options(), providers=["CPUExecutionProvider"])

    def bound(s: ort.InferenceSession, weights: dict):
        bind = s.io_binding()
        for n, v in weights.items():
            bind.bind_ortvalue_input(n, v)
        in_name, out_name = s.get_inputs()[0].name, s.get_outputs()[0].name

        def forward():  # both graphs fed the same way: only the weights' kind differs
            bind.bind_cpu_input(in_name, x)
            bind.bind_output(out_name, "cpu")
            s.run_with_iobinding(bind)
            return bind.copy_outputs_to_cpu()
        return forward

    shapes = [list(a.shape) for n, a in values.items() if a.dtype == np.int8]
    rq = ort.InferenceSession(_requantize_graph(shapes), options(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {f"w{i}": ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(s[::-1]).astype(np.float32))
             for i, s in enumerate(shapes)}
    rq_out = [o.name for o in rq.get_outputs()]
    fold = float_swappable.session(threads=1)
    fold.set_task("default")
    model_file = str(graph)
    return {
        "onnxruntime/int8_bound": steady(bound(dense, {})),
        "onnxruntime/int8_weights_as_inputs": steady(bound(sess, held)),
        "onnxruntime/float32_fold": lambda: timed(lambda: fold.set_task("default"))[0],
        "onnxruntime/requantize": lambda: timed(lambda: rq.run_with_ort_values(rq_out, feeds))[0],
        "onnxruntime/reload_int8": lambda: timed(lambda: ort.InferenceSession(
            model_file, options(), providers=["CPUExecutionProvider"]))[0],
        "_keep": (sess, dense, held, rq, feeds, fold),  # alive while the cases run; not a case
    }


def executorch_cases(int8_bundle) -> dict:
    """The timed cases of the ExecuTorch alternative: reloading the int8 dense program."""
    from crisp_edge.export.executorch.session import load_program

    data = int8_bundle.file("model.pte").read_bytes()

    def reload():
        def load():
            program = load_program(data, "int8 program")
            return program, program.load_method("forward")
        return timed(load)[0]

    return {"executorch/reload_int8": reload}


def executorch_swappable(model, x, work: Path, name: str):
    """(the int8 swappable ExecuTorch bundle of ``model`` with tasks t1 and t2, a session on it, its cases)."""
    from crisp_edge.export import export_executorch
    from crisp_edge.testing import make_task_file

    tasks = [make_task_file(model, work / f"{name}_t{i}.mixers.safetensors", task=f"t{i}", seed=i) for i in (1, 2)]
    bundle = export_executorch(model, work / f"{name}_et_swap_int8", mode="swappable", quantize="int8",
                               example_input=x, tasks=tasks)
    sess = bundle.session(threads=1)
    sess.set_task("default")
    paths = [bundle.path / "tasks" / f"t{i}.ptd" for i in (1, 2)]
    state = {"i": 0}

    def switch() -> float:
        state["i"] += 1
        return timed(lambda: sess.set_task(paths[state["i"] % 2]))[0]

    return bundle, sess, {"executorch/swappable_int8": steady(lambda: sess(x)),
                          "executorch/switch_int8_from_file": switch}


def summarize(med: dict, targets: dict) -> dict:
    """Per runtime: what swappable int8 would cost, in int8 dense forwards, and whether it meets the goals."""
    out = {}
    i8 = med["onnxruntime/int8"]["median"]
    fwd = med["onnxruntime/int8_weights_as_inputs"]["median"] / med["onnxruntime/int8_bound"]["median"]
    switch = (med["onnxruntime/float32_fold"]["median"] + med["onnxruntime/requantize"]["median"]) / i8
    out["onnxruntime"] = {
        "forward_int8_weights_as_inputs_vs_int8_dense": round(fwd, 4),
        "switch_estimate_in_int8_forwards": round(switch, 4),
        "switch_parts_in_int8_forwards": {"float32_fold": round(med["onnxruntime/float32_fold"]["median"] / i8, 4),
                                          "requantize": round(med["onnxruntime/requantize"]["median"] / i8, 4)},
        "reload_int8_model_in_int8_forwards": round(med["onnxruntime/reload_int8"]["median"] / i8, 4),
        "float32_dense_forward_in_int8_forwards": round(med["onnxruntime/float32"]["median"] / i8, 4),
        "meets": {"forward": fwd <= targets["swappable_ratio"], "switch": switch <= targets["switch_forwards"]},
    }
    e8 = med["executorch/int8"]["median"]
    out["executorch"] = {
        "reload_int8_program_in_int8_forwards": round(med["executorch/reload_int8"]["median"] / e8, 4),
        "float32_dense_forward_in_int8_forwards": round(med["executorch/float32"]["median"] / e8, 4),
    }
    if "executorch/swappable_int8" in med:
        fwd = med["executorch/swappable_int8"]["median"] / e8
        switch = med["executorch/switch_int8_from_file"]["median"] / e8
        out["executorch"].update({
            "swappable_int8_vs_int8_dense": round(fwd, 4), "switch_from_file_in_int8_forwards": round(switch, 4),
            "meets": {"forward": fwd <= targets["swappable_ratio"], "switch": switch <= targets["switch_forwards"]}})
    return out
