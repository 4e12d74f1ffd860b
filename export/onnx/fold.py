"""The fold graph of a swappable bundle: task tensors in, every CRISP layer's dense weight out.

Built directly with ``onnx.helper`` (not traced), so that its overridable initializers carry exactly
the tensor names of a crisp-edge mixer file: ``mixer.<group>`` (n x r x s), ``bias.<group>``
(n x d_out) and ``head.weight`` / ``head.bias``. An ``.onnx_adapter`` is then the mixer file's
tensors under their own names. Per group the graph computes all n layers with the gate applied once to the stacked mixers:

    G = gate(A)                                      # A: mixer.<group>, (n, r, s); "pre" placement
    T = MatMul(Reshape(Transpose(G), (n*s, r)), Bt)   # Bt: the shared basis transposed (r, u), read once per group
    W_i = Transpose(Split(T, axis=0)[i])              # rows [i*s, (i+1)*s) of T: (s, u) -> (u, s), W_i row-major

(one product per group rather than one per layer: the fold is memory-bound and B, n times the size of
a layer's weight at full capacity, is then read once; measured 0.52 -> 0.41 forwards on ViT-S and
0.62 -> 0.55 on ViT-B, 1 thread). The product is taken transposed, (n*s, u), so that each layer's
numbers are one contiguous block of rows (a plain memory copy splits them) and MLAS runs its wide
kernel (u columns); then one 2-D transpose per layer. Taken the other way, (u, n*s), splitting the
columns copies 16-byte rows one by one: 68% of the fold's time, and the whole fold 16-24% slower on one
ViT-S fc1 group (u = 147,456, r = 16, s = 4; 1 thread). ``temp`` and ``post`` placements build each
layer separately.

These three passes (on ViT-S, 1 thread: the product 37% of the fold, the split 20%, the transposes 41%)
are the cheapest of the ways measured to write the layout the inference graph reads, W (d_out, d_in)
row-major: a matrix product writes its output columns contiguously, and a layer's W has s of them; one
node writes one output, so a product shared by a group is split by a copy. ``bench/bench_fold_layouts.py``
times the alternatives at ViT-S's shapes (``bench/results/fold_layouts.json``): one narrow product a layer
(``B @ G(A_i)``, straight into W) 1.15x this fold, the group's wide product ``(u, n*s)`` split on its
columns 1.11x, this fold free to pre-pack the bases 1.00x, and the product batched into W^T's layout (no
transpose) 0.84x, but the forward's products by W^T then take 1.086x as long (qkv and fc1 1.12x):
5.3 ms more on every forward to save 5.5 ms a switch. A kernel that transposes in registers as it
multiplies (``bench/_fused_fold.c``, no stock operator of either runtime) takes 0.41x.

Outputs are named ``dense.<parameter name>`` (e.g. ``dense.blocks.0.mlp.fc1.weight``); the inference
graph takes the same names as inputs. A CRISP weight leaves the fold in its *folded layout* (u, s),
u = d_out * d_in / s, the product's own shape: a Reshape to (d_out, d_in) on a fold output would copy
every weight (ORT copies into graph outputs: 7 of 25 ms of a ViT-S fold), while the same Reshape
inside the inference graph, on a graph input, is free (an alias). ``take_folded_weights`` adds it
there. The bases are plain initializers: stored once, never replaced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from crisp_edge.export.errors import ExportError
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from crisp_edge.files.mixers import head_module
from crisp_edge.method.convert import crisp_bases

DENSE_PREFIX = "dense."
#: Symbolic name of the head's class axis: a task's head may have another class count.
CLASS_AXIS = "num_classes"


@dataclass(frozen=True)
class FoldSpec:
    """What the fold graph produces, and the overridable tensors (name -> shape; str = symbolic)."""

    overridable: dict[str, list]
    outputs: dict[str, str]  # fold output name -> parameter name in the model
    head: str | None         # the head module's path, when the head is swappable
    #: output in folded layout -> ((u, s), the shape it reshapes to, transposed): (d_out, d_in), or
    #: (d_in, d_out) and then a transpose for a transposed group
    folded: dict[str, tuple[list[int], list[int], bool]]


def _np(t) -> np.ndarray:
    return t.detach().cpu().float().contiguous().numpy()


def _gate(nodes: list, x: str, gate: str, tag: str) -> str:
    out = f"{tag}.gated"
    if gate == "silu":
        nodes += [helper.make_node("Sigmoid", [x], [f"{tag}.sig"]), helper.make_node("Mul", [f"{tag}.sig", x], [out])]
    elif gate == "relu":
        nodes.append(helper.make_node("Relu", [x], [out]))
    elif gate == "none":
        nodes.append(helper.make_node("Identity", [x], [out]))
    elif gate == "gelu":  # exact erf form, as torch.nn.functional.gelu (opset 18 has no Gelu op)
        nodes += [helper.make_node("Mul", [x, "const.inv_sqrt2"], [f"{tag}.xs"]),
                  helper.make_node("Erf", [f"{tag}.xs"], [f"{tag}.erf"]),
                  helper.make_node("Add", [f"{tag}.erf", "const.one"], [f"{tag}.erf1"]),
                  helper.make_node("Mul", [x, f"{tag}.erf1"], [f"{tag}.xe"]),
                  helper.make_node("Mul", [f"{tag}.xe", "const.half"], [out])]
    else:
        raise ExportError(f"gate {gate!r} has no ONNX fold; supported: silu, relu, none, gelu.")
    return out


def build_fold_graph(model: nn.Module, opset: int, head: bool = True) -> tuple[onnx.ModelProto, FoldSpec]:
    """The fold graph of a CRISP ``model`` (its current mixers, biases and head are the defaults).

    ``head=False`` leaves the architecture's head out (a language model's ``lm_head`` is the vocabulary
    projection, often tied to the embedding: not a task tensor)."""
    nodes: list = []
    inits = [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in
             (("const.one", 1.0), ("const.half", 0.5), ("const.inv_sqrt2", 1 / math.sqrt(2)))]
    overridable: dict[str, list] = {}
    outputs: dict[str, str] = {}
    value_infos = []

    def add_overridable(name: str, array: np.ndarray, shape: list) -> None:
        inits.append(numpy_helper.from_array(array, name))
        overridable[name] = shape
        value_infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    def add_output(out: str, param: str, shape: list) -> None:
        outputs[out] = param
        out_infos.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))

    out_infos: list = []
    folded: dict[str, tuple[list[int], list[int], bool]] = {}

    def add_weight(out: str, param: str, basis) -> None:
        shape = [basis.u, basis.s]
        folded[out] = (shape, list(basis.folded_dense_shape), basis.transpose)
        add_output(out, param, shape)

    for key, basis in crisp_bases(model).items():
        layers = [model.get_submodule(n) for n in basis.layer_names]
        n, mixer, b = len(layers), f"mixer.{key}", f"basis.{key}"
        # "pre" stores the basis transposed, (r, u): the product below is taken transposed
        bw = _np(basis.weight)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(bw.T) if basis.placement == "pre" else bw, b))
        add_overridable(mixer, np.stack([_np(l.crisp_mixer) for l in layers]), [n, basis.r, basis.s])
        tag = f"fold.{key}"
        if basis.placement == "pre":
            g = _gate(nodes, mixer, basis.gate_name, tag)  # gate all n mixers at once: (n, r, s)
        elif basis.placement == "temp":
            g = _gate(nodes, b, basis.gate_name, tag)
        elif basis.placement != "post":
            raise ExportError(f"group {key}: placement {basis.placement!r} has no ONNX fold.")
        if basis.placement == "pre":
            # One product for the whole group, B read once: (n*s x r) @ (r x u), rows [i*s, (i+1)*s) = layer i's
            # G(A_i)^T B^T = W_i^T (s x u); split off (contiguous rows), each transposed to the output (u x s).
            perm = f"{tag}.gt"
            nodes.append(helper.make_node("Transpose", [g], [perm], perm=[0, 2, 1]))  # (n, s, r)
            sr = f"{tag}.sr"
            inits.append(numpy_helper.from_array(np.array([n * basis.s, basis.r], np.int64), sr))
            nodes.append(helper.make_node("Reshape", [perm, sr], [f"{tag}.gall"]))
            nodes.append(helper.make_node("MatMul", [f"{tag}.gall", b], [f"{tag}.all"]))
            parts = [f"{tag}.t{i}" for i in range(n)]
            nodes.append(helper.make_node("Split", [f"{tag}.all"], parts, axis=0, num_outputs=n))
            for part, name in zip(parts, basis.layer_names):
                out = f"{DENSE_PREFIX}{name}.weight"
                nodes.append(helper.make_node("Transpose", [part], [out], perm=[1, 0]))
                add_weight(out, f"{name}.weight", basis)
        for i, name in enumerate(basis.layer_names if basis.placement != "pre" else []):
            # temp / post: one (u x s) product per layer.
            idx = f"{tag}.idx{i}"
            inits.append(numpy_helper.from_array(np.array(i, np.int64), idx))
            out = f"{DENSE_PREFIX}{name}.weight"
            nodes.append(helper.make_node("Gather", [mixer, idx], [f"{tag}.a{i}"], axis=0))
            if basis.placement == "temp":
                nodes.append(helper.make_node("MatMul", [g, f"{tag}.a{i}"], [out]))
            else:  # post: gate after the product
                nodes.append(helper.make_node("MatMul", [b, f"{tag}.a{i}"], [f"{tag}.ba{i}"]))
                _gate(nodes, f"{tag}.ba{i}", basis.gate_name, f"{tag}.l{i}")
                nodes.append(helper.make_node("Identity", [f"{tag}.l{i}.gated"], [out]))
            add_weight(out, f"{name}.weight", basis)
        if all(l.bias is not None for l in layers):
            bias = f"bias.{key}"
            add_overridable(bias, np.stack([_np(l.bias) for l in layers]), [n, basis.d_out])
            bparts = [f"{tag}.bias{i}" for i in range(n)]
            nodes.append(helper.make_node("Split", [bias], bparts, axis=0, num_outputs=n))
            bshape = f"{tag}.bshape"
            inits.append(numpy_helper.from_array(np.array([basis.d_out], np.int64), bshape))
            for i, name in enumerate(basis.layer_names):
                out = f"{DENSE_PREFIX}{name}.bias"
                nodes.append(helper.make_node("Reshape", [bparts[i], bshape], [out]))
                add_output(out, f"{name}.bias", [basis.d_out])
    head_path = None
    found = head_module(model) if head else None
    if found is not None:
        head_path, head = found
        add_overridable("head.weight", _np(head.weight), [CLASS_AXIS, head.in_features])
        nodes.append(helper.make_node("Identity", ["head.weight"], [f"{DENSE_PREFIX}{head_path}.weight"]))
        add_output(f"{DENSE_PREFIX}{head_path}.weight", f"{head_path}.weight", [CLASS_AXIS, head.in_features])
        if head.bias is not None:
            add_overridable("head.bias", _np(head.bias), [CLASS_AXIS])
            nodes.append(helper.make_node("Identity", ["head.bias"], [f"{DENSE_PREFIX}{head_path}.bias"]))
            add_output(f"{DENSE_PREFIX}{head_path}.bias", f"{head_path}.bias", [CLASS_AXIS])
    # Listing an initializer among the graph inputs makes it overridable (ONNX IR >= 4): the only
    # kind of tensor an .onnx_adapter may replace.
    used = {i for node in nodes for i in node.input}
    inits = [t for t in inits if t.name in used]  # the gelu constants only when a gelu gate uses them
    graph = helper.make_graph(nodes, "crisp_fold", value_infos, out_infos, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="crisp-edge")
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto)
    return proto, FoldSpec(overridable, outputs, head_path, folded)


def take_folded_weights(proto: onnx.ModelProto, spec: FoldSpec) -> onnx.ModelProto:
    """The inference graph ``proto`` (taking each weight as a (d_out, d_in) input) rewritten to take the
    fold's outputs as they are: each folded-layout input declared (u, s) and reshaped in the graph
    (a free alias on a graph input, where the same Reshape in the fold would copy); a transposed
    group's weight is reshaped to (d_in, d_out) and transposed, which ORT folds into the MatMul."""
    graph = proto.graph
    inputs = {i.name: i for i in graph.input}
    missing = sorted(set(spec.folded) - set(inputs))
    if missing:
        raise ExportError(f"the inference graph takes no input {missing[0]!r} (of {len(missing)} fold outputs).")
    rename = {name: f"{name}.dense" for name in spec.folded}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    reshapes = []
    for name, (shape, dense_shape, transpose) in spec.folded.items():
        dims = inputs[name].type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dims.add().dim_value = d
        target = f"{name}.dense_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(dense_shape, np.int64), target))
        reshaped = f"{name}.transposed" if transpose else rename[name]
        reshapes.append(helper.make_node("Reshape", [name, target], [reshaped], name=f"{name}.to_dense"))
        if transpose:
            reshapes.append(helper.make_node("Transpose", [reshaped], [rename[name]], perm=[1, 0], name=f"{name}.untranspose"))
    nodes = reshapes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto
