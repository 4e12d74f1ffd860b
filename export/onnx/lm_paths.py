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
reaches the pre-packed speed for one token: that gap (SmolLM2 decode 0.90x) is the cost of weights that
are inputs.

``two_path_graph`` wraps the whole graph but the vocabulary projection in ``If(new tokens == 1)``: the
*decode* branch is the graph as exported, the *prefill* branch the same nodes with every weight product
flipped. One ``If`` per run (one
per product cost 2 points of decode on the SmolLM2-shaped model); the ``lm_head`` product and its
transposed constant stay outside, so that constant is folded and pre-packed once, not once per branch.

A transposed group's weight (``RoleConfig(transpose=True)``: ``W^T`` is the fold's own layout) keeps
``x @ Wt`` in both branches: flipping it would make ONNX Runtime transpose ``A`` on every call (0.73x of
the pre-packed prefill in a probe of 120 SmolLM2-sized weights; not one of the benchmark's kinds).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from crisp_edge.export.errors import ExportError

#: The branch (and value-name prefix) of each path.
DECODE, PREFILL = "crisp.decode", "crisp.prefill"


def _consumers(nodes) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def flip_weight_products(nodes: list, weights: list[str]) -> tuple[list, list[str]]:
    """``nodes`` (copied) with each ``MatMul(x, Transpose(w))`` on a weight value ``w`` in ``weights`` written
    as ``Transpose(MatMul(w, Transpose(x)))``; returns (nodes, the weights flipped). ``x`` is rank 3
    (batch, tokens, d_in), as every projection of a causal LM's with-past graph."""
    nodes = [copy.deepcopy(n) for n in nodes]
    cons = _consumers(nodes)
    replace: dict[int, list] = {}
    flipped = []
    for w in weights:
        transposes = cons.get(w, [])
        matmuls = [m for t in transposes for m in cons.get(t.output[0], [])]
        if not transposes or any(t.op_type != "Transpose" or list(t.attribute[0].ints) != [1, 0] for t in transposes) \
                or any(m.op_type != "MatMul" or m.input[0] in {t.output[0] for t in transposes} for m in matmuls):
            continue  # not the exporter's x @ W^T: left as it is (correct, only not flipped)
        for t in transposes:
            replace[id(t)] = []
        for m in matmuls:
            x, y = m.input[0], m.output[0]
            replace[id(m)] = [helper.make_node("Transpose", [x], [f"{y}.xt"], perm=[0, 2, 1], name=f"{m.name}.xt"),
                              helper.make_node("MatMul", [w, f"{y}.xt"], [f"{y}.yt"], name=f"{m.name}.flipped"),
                              helper.make_node("Transpose", [f"{y}.yt"], [y], perm=[0, 2, 1], name=f"{m.name}.yt")]
        flipped.append(w)
    out = []
    for n in nodes:
        out += replace.get(id(n), [n])
    return out, flipped


def _branch(nodes: list, outputs: list[str], tag: str) -> onnx.GraphProto:
    """A subgraph of ``nodes`` returning ``outputs``; every value it makes is renamed ``tag/name`` (a
    subgraph may not redefine an outer value, and the two branches make the same values)."""
    made = {o for n in nodes for o in n.output}

    def ren(name: str) -> str:
        return f"{tag}/{name}" if name in made else name

    for n in nodes:
        n.input[:] = [ren(i) for i in n.input]
        n.output[:] = [ren(o) for o in n.output]
        n.name = f"{tag}/{n.name}" if n.name else ""
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(ren(o), TensorProto.FLOAT, None)
                                              for o in outputs])


def two_path_graph(proto: onnx.ModelProto, weights: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """``proto`` (an LM graph taking ``weights`` as (d_out, d_in) values fed to ``MatMul(x, Transpose(w))``)
    as ``If(input_ids has one token)``: decode branch as exported, prefill branch with those products
    flipped; the node making ``logits`` and its constant operand stay outside. Returns (graph, flipped)."""
    graph = proto.graph
    made_by = {o: n for n in graph.node for o in n.output}
    head = made_by.get("logits")
    if head is None:
        raise ExportError("the language-model graph has no node making 'logits'; cannot split its two paths.")
    inits = {t.name for t in graph.initializer}
    outer = [made_by[i] for i in head.input  # lm_head's transposed weight, then lm_head
             if i in made_by and all(j in inits for j in made_by[i].input)] + [head]
    outer_made = {o for n in outer for o in n.output}
    body = [n for n in graph.node if not outer_made.intersection(n.output)]
    outputs = [i for i in head.input if i in made_by and i not in outer_made]
    outputs += [o.name for o in graph.output if o.name != "logits"]
    prefill, flipped = flip_weight_products(body, weights)
    if not flipped:
        return proto, []
    outer = [copy.deepcopy(n) for n in outer]
    decode = _branch([copy.deepcopy(n) for n in body], outputs, DECODE)
    graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "crisp.axis_tokens"),
                              numpy_helper.from_array(np.array(1, np.int64), "crisp.one_token")])
    nodes = [helper.make_node("Shape", ["input_ids"], ["crisp.ids_shape"], name="crisp.ids_shape"),
             helper.make_node("Gather", ["crisp.ids_shape", "crisp.axis_tokens"], ["crisp.tokens"], axis=0,
                              name="crisp.tokens"),
             helper.make_node("Equal", ["crisp.tokens", "crisp.one_token"], ["crisp.is_decode"], name="crisp.is_decode"),
             helper.make_node("If", ["crisp.is_decode"], outputs, name="crisp.paths",
                              then_branch=decode, else_branch=_branch(prefill, outputs, PREFILL))]
    del graph.node[:]
    graph.node.extend(nodes + outer)
    return proto, flipped
