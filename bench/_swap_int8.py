"""Swappable int8 against the int8 dense bundle, for ``bench_quantize.py`` (issue 19), as cases of one interleaved run.

ONNX Runtime: the swappable int8 bundle (``export_onnx(mode="swappable", quantize="int8")``, tasks ``t1`` and ``t2``)
  * ``swappable_int8``: forwards with ``t1`` active (the int8 graph, its MatMulInteger weights and per-channel
    scales bound once through an IOBinding), against ``int8``, the dense int8 bundle's session;
  * ``switch_int8``: one ``set_task``, alternating ``t1`` / ``t2`` (tasks verified once, their files unchanged): the
    fused fold+quantize kernel (``fold_kernel.fold_quant_group``) writing every layer's codes and scales;
  * ``switch_from_file_int8``: ``set_task("t1")`` right after ``os.utime`` on its ``.onnx_adapter``, as a user pays it
    for a task file the session has not verified: the file read, its SHA-256 checked, parsed and checked, then
    the switch;
  * ``switch_from_file_graph_fold``: the same in a session running the bundle's fold graph (an app using ONNX
    Runtime alone: the float fold, then the per-channel quantization in the graph);
  * ``reload_int8``: creating a session on the int8 dense model file (the anchor: a dense int8 model per task).

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

import os
from pathlib import Path

import onnxruntime as ort
from _common import bench_task, steady, timed


def onnx_cases(int8_bundle, swap_int8, x, options) -> dict:
    """The timed cases (name -> case) of ONNX Runtime's swappable int8 bundle ``swap_int8`` (tasks t1, t2)."""
    from crisp_edge.export.onnx.session import OnnxCrispSession

    class GraphFold(OnnxCrispSession):
        use_fold_kernel = False

    sess, graph = swap_int8.session(threads=1), GraphFold(swap_int8)
    assert sess.fold_with == "crisp-edge kernel", sess.fold_with
    for s in (sess, graph):
        s.set_task("t2")
        s.set_task("t1")
    t1 = swap_int8.task_path("t1")
    state = {"i": 0}

    def switch():
        state["i"] += 1
        return timed(lambda: sess.set_task("t2" if state["i"] % 2 else "t1"))[0]

    def from_file(s):
        def case():
            os.utime(t1)  # a new mtime / ctime: the session's verified copy is stale, the file is read again
            return timed(lambda: s.set_task("t1"))[0]
        return case

    forward = steady(lambda: sess(x))

    def swappable():  # t1 active for the forward timing
        sess.set_task("t1")
        return forward()

    model_file = str(int8_bundle.file("model.onnx"))
    return {
        "onnxruntime/swappable_int8": swappable,
        "onnxruntime/switch_int8": switch,
        "onnxruntime/switch_from_file_int8": from_file(sess),
        "onnxruntime/switch_from_file_graph_fold": from_file(graph),
        "onnxruntime/reload_int8": lambda: timed(lambda: ort.InferenceSession(
            model_file, options(), providers=["CPUExecutionProvider"]))[0],
        "_keep": (sess, graph),  # alive while the cases run; not a case
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
    """(the int8 swappable ExecuTorch bundle of ``model`` with tasks t1 and t2, a session on it, its cases). The tasks
    are ``bench_task``'s, as ONNX Runtime's swappable int8 bundle's in ``bench_quantize.py``: a full-size head and
    slightly perturbed mixers. (``make_task_file``'s default, a 3-class head over strongly perturbed mixers, gives a
    random-weight ViT-S logits of a few tenths, where the int8 bases' second rounding (max |diff| about 0.1, the
    same in both runtimes) takes parity's cosine over 3 logits under 0.995.)"""
    from crisp_edge.export import export_executorch

    tasks = [bench_task(model, work / f"{name}_t{i}.mixers.safetensors", f"t{i}", i) for i in (1, 2)]
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


def arithmetic(model, x) -> dict:
    """Multiply-adds of a switch's fold against one forward's products, over the CRISP layers: the fold computes
    each weight from the basis' r terms (r per weight), a forward multiplies each weight by every token (tokens
    per weight). The fold runs float32 multiply-adds, 16 a vector instruction; the int8 forward's products run 64
    an instruction (AVX-512 VNNI), so a fold of r terms costs at least about 4 r / tokens int8 forwards of arithmetic."""
    import torch

    from crisp_edge.method.convert import crisp_bases

    bases = crisp_bases(model)
    first = model.get_submodule(next(iter(bases.values())).layer_names[0])
    seen = {}

    def count(module, inputs, output) -> None:  # returns None: the output stays the layer's
        seen.setdefault("tokens", inputs[0].numel() // inputs[0].shape[-1])

    hook = first.register_forward_hook(count)
    with torch.no_grad():
        model(x)
    hook.remove()
    weights = sum(b.d_out * b.d_in * len(b.layer_names) for b in bases.values())
    fold = sum(b.d_out * b.d_in * b.r * len(b.layer_names) for b in bases.values())
    return {"crisp_weights": weights, "tokens_per_forward": seen["tokens"], "fold_multiply_adds": fold,
            "forward_multiply_adds": weights * seen["tokens"],
            "fold_over_forward_multiply_adds": round(fold / (weights * seen["tokens"]), 4)}


def summarize(med: dict, targets: dict) -> dict:
    """Per runtime: swappable int8 in int8 dense forwards (ONNX Runtime), and whether it meets the goals."""
    i8 = med["onnxruntime/int8"]["median"]
    fwd = med["onnxruntime/swappable_int8"]["median"] / i8
    switch = med["onnxruntime/switch_int8"]["median"] / i8
    from_file = med["onnxruntime/switch_from_file_int8"]["median"] / i8
    out = {"onnxruntime": {
        "swappable_int8_vs_int8_dense": round(fwd, 4),
        "switch_in_int8_forwards": round(switch, 4),
        "switch_from_file_in_int8_forwards": round(from_file, 4),
        "switch_from_file_graph_fold_in_int8_forwards": round(
            med["onnxruntime/switch_from_file_graph_fold"]["median"] / i8, 4),
        "reload_int8_model_in_int8_forwards": round(med["onnxruntime/reload_int8"]["median"] / i8, 4),
        "float32_dense_forward_in_int8_forwards": round(med["onnxruntime/float32"]["median"] / i8, 4),
        "meets": {"forward": fwd <= targets["swappable_ratio"], "switch_from_file": from_file <= targets["switch_forwards"]},
    }}
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
            "meets": {"forward": fwd <= targets["swappable_ratio"], "switch_from_file": switch <= targets["switch_forwards"]}})
    return out
