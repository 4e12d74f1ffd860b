"""The two graphs of a swappable int8 ONNX bundle (``export_onnx(mode="swappable", quantize="int8")``).

The inference graph is the dense int8 graph (``quantize.quantize_graph``: ONNX Runtime's ``quantize_dynamic``,
DynamicQuantizeLinear -> MatMulInteger, 7-bit int8 weights with one scale per output channel) of the model with the
exported task's weights, after which every CRISP layer's int8 weight and its scales are turned from initializers
into graph inputs, ``dense.<layer>.weight.int8`` (d_in, d_out) and ``dense.<layer>.weight.scale`` (d_out): the
task inputs; each layer's chain is written as the one ``DynamicQuantizeMatMul`` ONNX Runtime fuses it into for the
dense graph, with the bias input taken in (``fuse_dynamic_matmuls``). Biases and the head stay float32 inputs, as
in a float32 swappable bundle (the head is a task's own few numbers; ORT's dynamic quantization only quantizes
initializers). ORT cannot pre-pack a weight that is an input, so the forward costs a little more than the dense
int8 graph's (ViT-S about 1.09x; bench/results/quantize.json).

The bases are stored as int8 codes with one scale per term (``quantize_bases``: a quarter of the float32 bytes,
so the bundle is about the dense int8 bundle's size at full capacity, and a switch reads a quarter as much), in
channel-major column order where the group's shapes allow (``fold_kernel.channel_major``: the kernel then folds 16
output channels at a time straight into MatMulInteger's layout); the kernel folds the codes and multiplies each
term's scale into the mixers. The weights a switch quantizes are thus
the fold of already quantized bases: two roundings, about 1/254 and 1/128 of a range (parity's named tolerance says
so). The weights' codes span -64..64 (``quantize.WEIGHT_QMAX``), as the dense int8 graph's: exact in ONNX
Runtime's int8 kernel on every x86-64 CPU.

The fold graph still produces the inputs, so that an app running ONNX Runtime alone can switch tasks: the bases
dequantized (``DequantizeLinear``), the float fold of ``fold.py``, then per layer the symmetric per-channel quantization in the graph (``Abs`` -> ``ReduceMax``
per output channel -> scale = max / 64, 1 for an all-zero channel -> ``QuantizeLinear`` per row -> the int8
transpose MatMulInteger takes). crisp-edge's own session does both at once with the fused kernel instead
(``fold_kernel.fold_quant_group``, ``kernel_fold.KernelFold``): the same codes up to rounding ties, without
writing the float weights to memory. A task file is the float32 mixer file of a float32 swappable bundle of the
same model: tasks are mixers, the weights they give are quantized at the switch.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from crisp_edge.export import fold_kernel
from crisp_edge.export.errors import ExportError
from crisp_edge.export.onnx.fold import FoldSpec
from crisp_edge.export.onnx.quantize import WEIGHT_QMAX, fold_weight_transposes, quantize_graph
from crisp_edge.export.quantize import basis_codes

#: Suffixes of a layer's int8 task inputs after its fold output's name ``dense.<layer>.weight`` (and of a basis'
#: codes and scales after ``basis.<group>``).
CODES, SCALES = ".int8", ".scale"
#: Suffix of a channel-major basis' dequantized values, before the graph puts them back in product order.
CHANNEL_MAJOR = ".channel_major"
#: The fold graph's initializer holding the largest weight code (``WEIGHT_QMAX``; bundles written before the
#: 7-bit weights hold 127 as ``const.q127``), which ``kernel_fold`` reads so that its codes are the graph's.
QMAX_NAMES = ("const.qmax", "const.q127")


def int8_names(weight: str) -> tuple[str, str]:
    """(codes, scales) input names of the fold output ``weight``."""
    return weight + CODES, weight + SCALES


def int8_forward_graph(proto: onnx.ModelProto, spec: FoldSpec, state: dict[str, np.ndarray]
                       ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """(the inference graph with int8 task inputs, the quantizer's tool record). ``proto`` takes every fold output
    as an input of the dense parameter's shape (``export._WeightsAsInputs``); ``state``: parameter -> value of the
    exported task's dense weights (what ``quantize_dynamic`` quantizes, then replaced by inputs)."""
    graph = proto.graph
    weights = {w: spec.outputs[w] for w in spec.folded}
    kept = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(state[p], np.float32), w)
                             for w, p in weights.items())
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    fold_weight_transposes(proto)  # W^T as the MatMul's own initializer: what quantize_dynamic looks for
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(proto, str(path))
        tool = quantize_graph(path, "int8")
        proto = onnx.load(str(path))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    rename, inputs, found = {}, [], set()
    for node in graph.node:
        src = transposed.get(node.input[1].removesuffix("_quantized")) if node.op_type == "MatMulInteger" else None
        if src is None:
            continue
        base = node.input[1].removesuffix("_quantized")
        codes, scales = inits.get(base + "_quantized"), inits.get(base + "_scale")
        if codes is None or scales is None or codes.data_type != TensorProto.INT8 or len(scales.dims) != 1:
            raise ExportError(f"ONNX Runtime's quantize_dynamic wrote {src}'s MatMulInteger in an unexpected form "
                              "(no int8 '<weight>_quantized' with a per-channel '<weight>_scale'); onnxruntime "
                              f"{tool['onnxruntime']} is not the version this exporter knows: export in float32.")
        q, s = int8_names(src)
        found.add(src)
        rename.update({codes.name: q, scales.name: s})
        inputs += [helper.make_tensor_value_info(q, TensorProto.INT8, list(codes.dims)),
                   helper.make_tensor_value_info(s, TensorProto.FLOAT, list(scales.dims))]
    missing = sorted(set(weights) - found)
    if missing:
        raise ExportError(f"ONNX Runtime's quantize_dynamic left {len(missing)} CRISP weight(s) in float32 (e.g. "
                          f"{missing[0]!r}); a swappable int8 bundle needs every one as int8: export in float32.")
    left = [t for t in graph.initializer if t.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(left)
    for node in graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    graph.input.extend(inputs)
    fuse_dynamic_matmuls(proto, set(weights))
    return proto, tool


def fuse_dynamic_matmuls(proto: onnx.ModelProto, weights: set[str]) -> int:
    """Write each task weight's ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (scales) [-> Add bias]``
    as one ``DynamicQuantizeMatMul`` (com.microsoft) taking the bias too, in place; returns how many. ONNX
    Runtime's optimizer fuses the same chain at session creation, but takes a bias into the fused op only when
    the bias is a constant, and a swappable bundle's biases are task inputs: an Add over every linear's output
    more per forward (ViT-S: 1.17x the dense int8 graph instead of 1.06x, bench/results/quantize.json)."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def only(name: str, op: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op and name not in graph_outputs else None

    graph_outputs = {o.name for o in graph.output}
    drop, fused, replace = set(), 0, {}
    for mm in [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1].removesuffix(CODES) in weights]:
        dq = producer.get(mm.input[0])
        cast = only(mm.output[0], "Cast")
        mul = cast and only(cast.output[0], "Mul")
        scales = mul and producer.get(next((i for i in mul.input if i != cast.output[0]), ""))
        if dq is None or dq.op_type != "DynamicQuantizeLinear" or not mul or scales is None \
                or scales.op_type != "Mul" or len(mm.input) < 4:
            continue
        w_scale = next((i for i in scales.input if i != dq.output[1]), None)
        add = only(mul.output[0], "Add")
        bias = add and next(i for i in add.input if i != mul.output[0])
        bias = bias if bias and bias.endswith(".bias") and bias in {i.name for i in graph.input} else None
        out = add.output[0] if bias else mul.output[0]
        node = helper.make_node("DynamicQuantizeMatMul", [dq.input[0], mm.input[1], w_scale, mm.input[3]]
                                + ([bias] if bias else []), [out], name=f"{mm.name}_fused", domain="com.microsoft")
        replace[id(mm)] = node
        drop.update(id(n) for n in (cast, mul, scales) + ((add,) if bias else ()))
        fused += 1
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    used = {i for n in nodes for i in n.input} | graph_outputs
    nodes = [n for n in nodes if n.op_type != "DynamicQuantizeLinear" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def int8_fold_graph(proto: onnx.ModelProto, spec: FoldSpec) -> tuple[onnx.ModelProto, dict[str, str]]:
    """(the fold graph with each CRISP weight output replaced by its int8 codes and scales, quantized in the
    graph; fold output -> model parameter). The float weight becomes an internal value."""
    graph = proto.graph
    nodes, new_outputs, mapping = [], [], {}
    graph.initializer.extend([numpy_helper.from_array(np.array(WEIGHT_QMAX, np.float32), QMAX_NAMES[0]),
                              numpy_helper.from_array(np.array(0, np.float32), "const.q0"),
                              numpy_helper.from_array(np.array(1, np.float32), "const.q1"),
                              numpy_helper.from_array(np.array([1], np.int64), "const.axis1")])
    for out in graph.output:
        name, param = out.name, spec.outputs[out.name]
        if name not in spec.folded:
            new_outputs.append(out)
            mapping[name] = param
            continue
        (_, _), dense_shape, transpose = spec.folded[name]
        d_out, d_in = dense_shape[::-1] if transpose else dense_shape
        t = f"{name}.q"
        shape = f"{t}.shape"
        graph.initializer.append(numpy_helper.from_array(np.array(dense_shape, np.int64), shape))
        graph.initializer.append(numpy_helper.from_array(np.zeros(d_out, np.int8), f"{t}.zero"))
        w = f"{t}.w"
        nodes.append(helper.make_node("Reshape", [name, shape], [w if not transpose else f"{t}.wt"]))
        if transpose:
            nodes.append(helper.make_node("Transpose", [f"{t}.wt"], [w], perm=[1, 0]))
        q, s = int8_names(name)
        nodes += [helper.make_node("Abs", [w], [f"{t}.abs"]),
                  helper.make_node("ReduceMax", [f"{t}.abs", "const.axis1"], [f"{t}.max"], keepdims=0),
                  helper.make_node("Div", [f"{t}.max", QMAX_NAMES[0]], [f"{t}.div"]),
                  helper.make_node("Greater", [f"{t}.max", "const.q0"], [f"{t}.nz"]),
                  helper.make_node("Where", [f"{t}.nz", f"{t}.div", "const.q1"], [s]),
                  helper.make_node("QuantizeLinear", [w, s, f"{t}.zero"], [f"{t}.codes"], axis=0),
                  helper.make_node("Transpose", [f"{t}.codes"], [q], perm=[1, 0])]
        new_outputs += [helper.make_tensor_value_info(q, TensorProto.INT8, [d_in, d_out]),
                        helper.make_tensor_value_info(s, TensorProto.FLOAT, [d_out])]
        mapping[q] = mapping[s] = param
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(new_outputs)
    quantize_bases(proto, group_shapes(proto, spec))
    onnx.checker.check_model(proto)
    return proto, mapping


def group_shapes(proto: onnx.ModelProto, spec: FoldSpec) -> dict[str, tuple[int, int, int]]:
    """basis name -> (d_out, d_in, s) of its group's layers, for every "pre" group not transposed (the bases whose
    fold ``fold.py`` writes as one product, split and transposed per layer)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    shapes = {}
    for out, ((_, s), dense_shape, transpose) in spec.folded.items():
        t = producer.get(out)
        split = t is not None and t.op_type == "Transpose" and producer.get(t.input[0])
        product = split and split.op_type == "Split" and producer.get(split.input[0])
        if product and product.op_type == "MatMul" and not transpose:
            shapes[product.input[1]] = (dense_shape[0], dense_shape[1], s)
    return shapes


def quantize_bases(proto: onnx.ModelProto, shapes: dict[str, tuple[int, int, int]]) -> int:
    """Store every "pre" group's basis (the right operand of its ``fold.<group>.gall`` product, (r, u)) as int8 codes
    ``basis.<group>.int8`` with one scale per term ``basis.<group>.scale``, dequantized in the graph
    (``DequantizeLinear``, axis 0) into the float basis the fold reads; in place, returns how many. A term's scale
    is one number for all of its u values, so the kernel folds the codes and multiplies the scale into the mixers
    (``kernel_fold``): a quarter of the bytes to store and to read at each switch.

    A basis whose group's shapes (``shapes``: d_out, d_in, s) allow it is stored channel-major
    (``fold_kernel.channel_major``: the kernel folds 16 output channels at once and writes their codes without a
    transpose, ViT-S's switch about 0.84x the time), put back in the graph by a Reshape -> Transpose -> Reshape
    after the dequantization (``CHANNEL_MAJOR``)."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    names = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[0].endswith(".gall")}
    nodes, done = [], set()
    for name in sorted(names):
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            continue
        codes, scale = basis_codes(numpy_helper.to_array(t))
        r, u = codes.shape
        d_out, d_in, s = shapes.get(name, (0, 0, 0))
        cm = name in shapes and fold_kernel.channel_major_fits(d_out, d_in, s) and d_out * d_in == u * s
        graph.initializer.extend([numpy_helper.from_array(fold_kernel.channel_major(codes, d_out, d_in, s) if cm else codes,
                                                          f"{name}{CODES}"),
                                  numpy_helper.from_array(scale, f"{name}{SCALES}"),
                                  numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}.zero")])
        dq = f"{name}{CHANNEL_MAJOR}" if cm else name
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}{CODES}", f"{name}{SCALES}", f"{name}.zero"], [dq],
                                      axis=0, name=f"{name}.dequantize"))
        if cm:  # (r, d_out / 16, d_in / s, 16) -> its two middle axes swapped -> (r, u): the basis in product order
            block = fold_kernel.CHANNEL_BLOCK
            graph.initializer.extend([
                numpy_helper.from_array(np.array([r, d_out // block, d_in // s, block], np.int64), f"{dq}.shape"),
                numpy_helper.from_array(np.array([r, u], np.int64), f"{name}.shape")])
            nodes += [helper.make_node("Reshape", [dq, f"{dq}.shape"], [f"{dq}.4d"]),
                      helper.make_node("Transpose", [f"{dq}.4d"], [f"{dq}.rows"], perm=[0, 1, 3, 2]),
                      helper.make_node("Reshape", [f"{dq}.rows", f"{name}.shape"], [name])]
        done.add(name)
    left = [t for t in graph.initializer if t.name not in done]
    del graph.initializer[:]
    graph.initializer.extend(left)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    return len(done)
