"""The swappable LM graph's two matmul paths: one ``If`` on the number of new tokens picks, per run, the
fastest way ONNX Runtime's CPU kernels have to multiply by a weight that is a graph *input*.

A dense bundle's weights are constant initializers: ONNX Runtime pre-packs each once, at session creation,
into MLAS's panel layout. A swappable bundle's weights are the fold's outputs, fed as inputs, so nothing
is pre-packed, and which kernel runs depends on how the product is written. CPU time against the pre-packed
constant, every projection of SmolLM2-135M's 30 blocks (424 MB, streamed from memory as in the model),
1 thread (``bench/bench_lm_matmul.py``, ``bench/results/lm_matmul.json``):

================================  ===============  ===============================
product (W: the weight input)     decode, 1 token  prefill, 64 tokens
================================  ===============  ===============================
``x @ Transpose(W)`` (exported)   0.875            0.838 (W packed on every call)
``x @ Wt``, Wt = W^T stored       0.899            0.694
``Transpose(W @ Transpose(x))``   0.556            0.950 (W read in place)
================================  ===============  ===============================

So prefill wants the flipped product, where the weight is MLAS's ``A`` operand (only the small activation
is packed), and decode the exported one (MLAS's one-row kernel; ``Wt`` would gain 2 points there and cost a
transpose of every weight at each switch, or a transposed group, and lose 14 points of prefill). No form
reaches the pre-packed speed for one token: that gap (SmolLM2-135M decode 0.94x the dense bundle's,
``bench/results/lm_onnx.json``) is the cost of weights that are inputs.

``two_path_graph`` writes each such product as ``If(new tokens == 1)``: the *decode* branch the product as
exported, the *prefill* branch flipped (the flag is computed once a run, from ``input_ids``' shape). Only
products of at least ``FLIP_MIN_WEIGHTS`` weights get the ``If``: each costs time on every run, worth
it on SmolLM2's MLP (576 x 1536) and not on its attention projections (SmolLM2-shaped, 8 blocks, CPU time
against dense: as exported 0.869x prefill / 0.899x decode; MLP flipped 0.956x / 0.897x; every product
flipped 0.964x / 0.878x; the whole graph in one ``If`` with two branches 0.974x / 0.864x: a large
subgraph costs decode more than many small ones, why not measured). The ``lm_head`` product reads a constant (pre-packed) and is left as it is.

A transposed group's weight (``RoleConfig(transpose=True)``: ``W^T`` is the fold's own layout) keeps its
one product ``x @ Wt``: flipping it would make ONNX Runtime transpose ``A`` on every call (0.73x of
the pre-packed prefill in a probe of 120 SmolLM2-sized weights; not one of the benchmark's kinds).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


#: The branch (and value-name prefix) of each path.
DECODE, PREFILL = "crisp.decode", "crisp.prefill"
#: Products by a weight of fewer numbers keep the one path (an ``If`` costs more than flipping them gains).
FLIP_MIN_WEIGHTS = 1 << 19


def _consumers(nodes) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def weight_products(nodes, weights: list[str]) -> dict[str, list[tuple]]:
    """For each of ``weights`` that feeds only the exporter's ``x @ W^T`` (``Transpose(perm=[1, 0])`` nodes, each
    feeding ``MatMul`` as its second operand), those (Transpose, MatMul) pairs; other weights are left out
    (left as they are: correct, only not given a prefill path)."""
    cons = _consumers(nodes)
    out = {}
    for w in weights:
        transposes = cons.get(w, [])
        if not transposes or any(t.op_type != "Transpose" or [list(a.ints) for a in t.attribute] != [[1, 0]]
                                 for t in transposes):
            continue
        pairs = [(t, m) for t in transposes for m in cons.get(t.output[0], [])]
        if pairs and all(m.op_type == "MatMul" and m.input[1] == t.output[0] != m.input[0] for t, m in pairs):
            out[w] = pairs
    return out


def _two_paths(w: str, m) -> onnx.NodeProto:
    """``If(crisp.is_decode)`` making ``m``'s output, ``x @ W^T``: decode ``MatMul(x, Transpose(w))`` as exported,
    prefill ``Transpose(MatMul(w, Transpose(x)))`` (``x`` rank 3: batch, tokens, d_in)."""
    x, y = m.input[0], m.output[0]
    out = {tag: helper.make_tensor_value_info(f"{tag}/{y}", TensorProto.FLOAT, None) for tag in (DECODE, PREFILL)}
    decode = helper.make_graph([helper.make_node("Transpose", [w], [f"{DECODE}/{y}.wt"], perm=[1, 0]),
                                helper.make_node("MatMul", [x, f"{DECODE}/{y}.wt"], [f"{DECODE}/{y}"])],
                               f"{DECODE}/{m.name}", [], [out[DECODE]])
    prefill = helper.make_graph([helper.make_node("Transpose", [x], [f"{PREFILL}/{y}.xt"], perm=[0, 2, 1]),
                                 helper.make_node("MatMul", [w, f"{PREFILL}/{y}.xt"], [f"{PREFILL}/{y}.yt"]),
                                 helper.make_node("Transpose", [f"{PREFILL}/{y}.yt"], [f"{PREFILL}/{y}"], perm=[0, 2, 1])],
                                f"{PREFILL}/{m.name}", [], [out[PREFILL]])
    return helper.make_node("If", ["crisp.is_decode"], [y], name=f"{m.name}.paths", then_branch=decode,
                            else_branch=prefill)


def flip_candidates(folded: dict[str, tuple[list[int], list[int], bool]]) -> list[str]:
    """The values (``<fold output>.dense``, as ``take_folded_weights`` names them) whose products get a prefill
    path: untransposed weights of at least ``FLIP_MIN_WEIGHTS`` numbers (``FoldSpec.folded``)."""
    return [f"{name}.dense" for name, (_, (d_out, d_in), transposed) in folded.items()
            if not transposed and d_out * d_in >= FLIP_MIN_WEIGHTS]


def two_path_graph(proto: onnx.ModelProto, weights: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """``proto`` (an LM graph feeding each of ``weights``, (d_out, d_in), to ``MatMul(x, Transpose(w))``) with each
    such product as ``If(input_ids has one token)``: decode branch as exported, prefill branch flipped.
    Returns (graph, the weights whose products were rewritten)."""
    graph = proto.graph
    nodes = list(graph.node)
    products = weight_products(nodes, weights)
    if not products:
        return proto, []
    drop = {t.output[0] for pairs in products.values() for t, _ in pairs}
    replace = {m.output[0]: _two_paths(w, m) for w, pairs in products.items() for _, m in pairs}
    graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "crisp.axis_tokens"),
                              numpy_helper.from_array(np.array(1, np.int64), "crisp.one_token")])
    out = [helper.make_node("Shape", ["input_ids"], ["crisp.ids_shape"], name="crisp.ids_shape"),
           helper.make_node("Gather", ["crisp.ids_shape", "crisp.axis_tokens"], ["crisp.tokens"], axis=0,
                            name="crisp.tokens"),
           helper.make_node("Equal", ["crisp.tokens", "crisp.one_token"], ["crisp.is_decode"], name="crisp.is_decode")]
    for n in nodes:
        if n.output[0] in replace:
            out.append(replace[n.output[0]])
        elif n.output[0] not in drop:
            out.append(copy.deepcopy(n))
    del graph.node[:]
    graph.node.extend(out)
    return proto, list(products)
