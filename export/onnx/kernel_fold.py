"""A swappable ONNX bundle's task switch with crisp-edge's fused fold kernel instead of the fold graph's products.

The fold graph (``fold.py``) computes each "pre" group's layers as one product, a split and a transpose per
layer: stock ONNX operators, about three times the cost of copying the weights once (the kernel: 1.6x). ``KernelFold`` gives the
same outputs from the same tensors with ``crisp_edge.export.fold_kernel`` (the kernel of ExecuTorch's
``crisp::fold_``: the basis read once, each layer's ``(u, s)`` weight written directly): the bases are read
from the fold graph's own initializers (the external data file ONNX Runtime maps, mapped read-only once more:
the same page-cache pages, released with ORT's after a switch), the gate applied to the task's mixers by the
library's own gate functions, and the outputs that are task tensors as they are (a layer's bias: a row of ``bias.<group>``; the head)
taken from the task's tensors; any other output would need the fold graph run (ORT runs a whole graph, not
only what the asked outputs need). The bundle does not change: an app running the fold graph in ONNX Runtime
alone gets the same weights at the graph's cost.
For a swappable int8 bundle the fold graph's outputs are each layer's int8 codes and per-channel scales
(``swap_int8``), which ``fold_kernel.fold_quant_group`` writes in one pass (a transposed group keeps the graph).
``build`` returns None, and the session keeps the fold graph,
where a group is not "pre" with one of the library's gates (``crisp_edge.method.gates``), where the graph is not the one
``fold.py`` writes, or where the kernel cannot be built (no g++).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from crisp_edge.export import fold_kernel
from crisp_edge.export.errors import AdapterError, BundleError
from crisp_edge.export.onnx.swap_int8 import CHANNEL_MAJOR, QMAX_NAMES, int8_names
from crisp_edge.method.gates import GATES, get_gate



def _initializer(t: onnx.TensorProto, folder: Path, data_file: Path | None, where: str) -> np.ndarray:
    """A float32 (or int8: a swappable int8 bundle's bases) initializer's values: inline, or a read-only map of its
    bytes in the bundle's data file."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    shape = tuple(int(d) for d in t.dims)
    dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT8: np.int8}.get(t.data_type)
    size = np.dtype(dtype or np.float32).itemsize * int(np.prod(shape))
    path = (folder / info.get("location", "")).resolve()
    offset, length = int(info.get("offset", 0)), int(info.get("length", size))
    if data_file is None or path != data_file.resolve() or length != size or dtype is None \
            or offset + size > path.stat().st_size:
        raise BundleError(f"{where}: {t.name} is not float32 or int8 data inside the bundle's own {data_file}.")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _channel_major_chain(producer: dict, inits: dict, basis: str, g: dict) -> bool:
    """Whether ``basis`` is its channel-major codes dequantized and put back in product order as ``swap_int8``
    writes it (Reshape to (r, d_out / 16, d_in / s, 16) -> Transpose (0, 1, 3, 2) -> Reshape): the kernel then
    folds the stored codes as they are (``fold_kernel.fold_quant_group(cm=True)``). ``producer``: the fold graph's
    node of each value; ``inits``: its initializers by name."""
    back = producer.get(basis)
    swap = back is not None and back.op_type == "Reshape" and producer.get(back.input[0])
    view = swap and swap.op_type == "Transpose" and producer.get(swap.input[0])
    if not view or view.op_type != "Reshape" or view.input[0] != f"{basis}{CHANNEL_MAJOR}" \
            or list(next((a.ints for a in swap.attribute if a.name == "perm"), [])) != [0, 1, 3, 2] \
            or view.input[1] not in inits or not fold_kernel.channel_major_fits(g["d_out"], g["d_in"], g["s"]):
        return False
    want = [g["r"], g["d_out"] // fold_kernel.CHANNEL_BLOCK, g["d_in"] // g["s"], fold_kernel.CHANNEL_BLOCK]
    return numpy_helper.to_array(inits[view.input[1]]).tolist() == want


def _passthrough(proto: onnx.ModelProto, outputs: list[str], defaults: dict[str, np.ndarray]) -> dict:
    """The fold outputs that are a task tensor as it is (``Identity``: the head) or one row of one
    (``Reshape(Split(t, axis 0)[i])``: a layer's bias): output -> (tensor name, row or None)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    row = {}
    for n in proto.graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Split" and n.input[0] in defaults and axis == 0 and len(n.output) == len(defaults[n.input[0]]):
            row.update({o: (n.input[0], i) for i, o in enumerate(n.output)})
    found = {}
    for out in outputs:
        n = producer.get(out)
        if n is not None and n.op_type == "Identity" and n.input[0] in defaults:
            found[out] = (n.input[0], None)
        elif n is not None and n.op_type == "Reshape" and n.input[0] in row:
            src, i = row[n.input[0]]
            if defaults[src].ndim == 2:  # (n, d_out) -> row i, (d_out,): the Reshape's own target
                found[out] = (src, i)
    return found


def _largest_code(inits: dict) -> int | None:
    """A swappable int8 fold graph's largest weight code (``swap_int8.QMAX_NAMES``: an inline scalar), or None where
    there is none or it is not an integer in 1..127 (the session then keeps the graph's own quantization)."""
    t = next((inits[k] for k in QMAX_NAMES if k in inits), None)
    if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    a = numpy_helper.to_array(t)
    if a.size != 1 or not np.isfinite(a).all() or float(a.flat[0]) != int(a.flat[0]) or not 1 <= int(a.flat[0]) <= 127:
        return None
    return int(a.flat[0])


#: ``sys.getrefcount`` of a spare array only ``KernelFold._spare`` refers to (its list, the comprehension's
#: variable, the call's argument).
_UNREFERENCED = 3


class KernelFold:
    """Per "pre" group: the mixers' name, the basis (r, u), the gate, the exported mixers, the fold outputs in
    layer order and, for a swappable int8 bundle (``swap_int8``), the weight's (d_out, d_in), the basis' scale
    per term, whether it is channel-major and the fold graph's largest code (the basis is then its int8 codes; the
    outputs each layer's int8 codes and scales, ``fold_kernel.fold_quant_group``); the outputs passed through from
    task tensors
    (biases, head), their exported values; and any other output, left to the fold graph."""

    def __init__(self, groups: list[tuple[str, np.ndarray, str, np.ndarray, list[str], tuple | None]],
                 passthrough: dict, defaults: dict[str, np.ndarray], others: list[str],
                 fold: ort.InferenceSession) -> None:
        self.groups, self.passthrough, self.defaults, self.others, self.fold = groups, passthrough, defaults, others, fold
        self._spare: dict[tuple[int, str], list[np.ndarray]] = {}  # arrays of earlier switches, per group and kind

    def _outs(self, key: tuple[int, str], n: int) -> list[np.ndarray] | None:
        """Group ``key``'s arrays of an earlier switch when nothing but this object refers to them any more (no
        session, binding or caller: ``sys.getrefcount``), so that a forward still bound to them never sees them
        change; else None (new arrays). Rewriting memory already mapped is a third of the cost of new arrays,
        which the kernel first has to fault in (ViT-S: 16 vs 45 ms for every group)."""
        free = [a for a in self._spare.setdefault(key, []) if sys.getrefcount(a) <= _UNREFERENCED]
        return free[:n] if len(free) >= n else None

    def _keep(self, key: tuple[int, str], arrays: list[np.ndarray]) -> None:
        """Remember this switch's arrays (and the latest spare ones) for a later switch to rewrite."""
        self._spare[key] = [a for a in self._spare[key] if not any(a is x for x in arrays)][-len(arrays):] + arrays

    @classmethod
    def build(cls, fold: ort.InferenceSession, fold_path: Path, data_file: Path | None, swap: dict,
              weight_names: list[str]) -> KernelFold | None:
        """The kernel fold of a bundle's fold graph, or None where the graph's own fold has to run (above)."""
        layout = swap["layout"]
        if any(g["placement"] != "pre" or g["gate"] not in GATES for g in layout.values()):
            return None
        if fold_kernel.kernel() is None:
            return None
        proto = onnx.load(str(fold_path), load_external_data=False)
        inits = {t.name: t for t in proto.graph.initializer}
        split = {n.input[0]: list(n.output) for n in proto.graph.node if n.op_type == "Split"}
        transpose = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type == "Transpose"}
        products = {(n.input[0], n.input[1]) for n in proto.graph.node if n.op_type == "MatMul"}
        dequantized = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        producer = {o: n for n in proto.graph.node for o in n.output}
        qmax = _largest_code(inits)
        groups, done, wanted = [], set(), set(weight_names)
        for key, g in layout.items():
            tag, basis, mixer = f"fold.{key}", f"basis.{key}", f"mixer.{key}"
            outs = [transpose.get(p) for p in split.get(f"{tag}.all", [])]
            if ((f"{tag}.gall", basis) not in products or len(outs) != g["n"] or None in outs
                    or mixer not in inits):
                return None  # not the graph fold.py writes for a "pre" group
            quantized, where = None, f"{fold_path}"
            if not set(outs) <= wanted:  # a swappable int8 bundle: each float weight leaves as codes and scales
                if g.get("transpose") or not all(set(int8_names(o)) <= wanted for o in outs) or qmax is None:
                    return None
                codes, scale = (inits.get(n) for n in int8_names(basis))  # its basis int8, a scale per term
                cm = basis not in dequantized  # stored channel-major, put back in product order by the graph
                if basis in inits or codes is None or scale is None \
                        or dequantized.get(f"{basis}{CHANNEL_MAJOR}" if cm else basis) != codes.name \
                        or (cm and not _channel_major_chain(producer, inits, basis, g)):
                    return None
                scale = np.array(_initializer(scale, fold_path.parent, data_file, where), np.float32)
                quantized = (g["d_out"], g["d_in"], scale, cm, qmax)
                outs = [name for o in outs for name in int8_names(o)]
            elif basis not in inits:
                return None
            b = _initializer(codes if quantized else inits[basis], fold_path.parent, data_file, where)
            m = np.ascontiguousarray(_initializer(inits[mixer], fold_path.parent, data_file, where))
            if b.shape != (g["r"], g["d_out"] * g["d_in"] // g["s"]) or m.shape != (g["n"], g["r"], g["s"]):
                return None
            groups.append((mixer, b, g["gate"], m, outs, quantized))
            done.update(outs)
        if not done <= set(weight_names):
            return None
        rest = [w for w in weight_names if w not in done]
        defaults = {k: np.array(_initializer(inits[k], fold_path.parent, data_file, str(fold_path)))
                    for k in swap["overridable"] if k in inits and not k.startswith("mixer.")}  # copies: small
        passthrough = _passthrough(proto, rest, defaults)
        return cls(groups, passthrough, defaults, [w for w in rest if w not in passthrough], fold)

    def run(self, name: str, arrays: dict[str, np.ndarray]) -> dict[str, ort.OrtValue]:
        """Every fold output for a task's tensors (the exported ones where the task has none)."""
        values: dict[str, ort.OrtValue] = {}
        for out, (src, i) in self.passthrough.items():  # biases and head: the task's tensors as they are
            a = arrays.get(src, self.defaults[src])
            values[out] = ort.OrtValue.ortvalue_from_numpy(a if i is None else np.ascontiguousarray(a[i]))
        if self.others:  # anything else: the graph's own nodes (ORT runs the whole graph for them)
            feeds = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
            try:
                values.update(zip(self.others, self.fold.run_with_ort_values(self.others, feeds, ort.RunOptions())))
            except Exception as e:  # noqa: BLE001 - ORT's own error
                raise AdapterError(f"task {name!r}: the fold run failed in ONNX Runtime: {e}") from None
        for g, (mixer, basis, gate, default, outs, quantized) in enumerate(self.groups):
            a = arrays.get(mixer, default)
            gated = get_gate(gate).fn(torch.tensor(np.asarray(a, np.float32))).numpy()  # the library's gate (a small copy)
            n = len(gated)
            if quantized is None:
                ws = fold_kernel.fold_group(basis, gated, True, self._outs((g, "w"), n))
                self._keep((g, "w"), ws)
            else:  # codes and scales of each layer, in the fold graph's output order; the basis' codes summed as
                # they are, each term's scale multiplied into the mixers (one number per term)
                d_out, d_in, term_scale, cm, qmax = quantized
                gated = gated * term_scale[None, :, None]
                codes, scales = self._outs((g, "codes"), n), self._outs((g, "scales"), n)
                codes, scales = fold_kernel.fold_quant_group(basis, gated, True, d_out, d_in,
                                                             None if codes is None or scales is None else (codes, scales),
                                                             cm=cm, qmax=qmax)
                self._keep((g, "codes"), codes)
                self._keep((g, "scales"), scales)
                ws = [w for pair in zip(codes, scales) for w in pair]
            for out, w in zip(outs, ws):
                values[out] = ort.OrtValue.ortvalue_from_numpy(w)
        return values
