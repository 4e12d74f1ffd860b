"""Quantized ONNX bundles: ONNX Runtime's own dynamic quantization of the inference graph.

``quantize_graph(path, "int8")`` rewrites ``model.onnx`` in place with
``onnxruntime.quantization.quantize_dynamic``: every MatMul / Gemm weight becomes int8 with one scale per
output channel (``per_channel=True``), and activations are quantized at run time
(``DynamicQuantizeLinear`` -> ``MatMulInteger``). Layer norms, biases, embeddings and the convolution
patch embedding stay float32 (ORT's dynamic path quantizes matrix products only).

``quantize_lm_graph(proto, scheme)`` does it for a language model's with-past graph, which is exported
without constant folding (every weight an initializer feeding ``Transpose`` then ``MatMul``):
``fold_weight_transposes`` first stores each transposed weight as the MatMul's own initializer (what ORT's
quantizers look for), then ``MatMulNBitsQuantizer`` rewrites every MatMul as ``MatMulNBits``: 8 ("int8") or 4
("int4") bit symmetric weights in blocks of ``INT4_GROUP`` along the input, ``accuracy_level=4`` (the kernel
quantizes each row's activations to int8 per block: ORT's 8da8w / 8da4w). Not ``quantize_dynamic`` here: it
quantizes a MatMul's activations with one scale per tensor, and a LLaMA's hidden states carry a few outlier
channels that then crush every other value; measured on SmolLM2-135M, its logits were 18.7 off the float
model's (cosine 0.967) and greedy decoding left the float path at the second token, where ``MatMulNBits``
8-bit stays close (bench/results/lm_quantize.json). The embedding's Gather stays float32; the ``lm_head`` is a
MatMul like the others, so tied to the embedding (SmolLM2) it is stored twice, float32 for the Gather and
quantized for the head.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import onnx
from onnx import numpy_helper

from crisp_edge.export.quantize import INT4_GROUP

#: scheme -> the bundle modes ONNX Runtime can run it in (see crisp_edge.export.quantize).
MODES: dict[str, tuple[str, ...]] = {"int8": ("dense",), "int4": ("dense",)}
#: Why the other modes are refused (measured: bench/results/quantize.json, ``swappable_int8``).
REFUSALS: dict[str, str] = {
    "swappable": "A swappable quantized bundle would feed the integer kernels (MatMulInteger, MatMulNBits) its "
                 "quantized weights and scales as inputs, which ONNX Runtime cannot pre-pack (slower than the "
                 "quantized dense bundle on every forward), and each task switch would be the float32 fold plus a "
                 "requantization, more than the forwards a switch may cost (measured for int8: "
                 "bench/results/quantize.json, swappable_int8).",
    "factored": "A factored bundle builds its weights in float32 on every forward; quantizing them there would "
                "add a requantization to every forward.",
}


def quantize_graph(path: Path, scheme: str) -> dict[str, Any]:
    """Quantize the ONNX file at ``path`` in place; returns the tool record for the manifest."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert scheme == "int8", scheme  # the only scheme in MODES; check_scheme refuses the rest
    tmp = path.with_name(f".{path.name}.int8.tmp")
    try:
        with _quiet_root():
            quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"name": "onnxruntime.quantization.quantize_dynamic", "onnxruntime": onnxruntime.__version__,
            "per_channel": True, "weight_type": "QInt8", "reduce_range": False}


@contextmanager
def _quiet_root() -> Iterator[None]:
    """ORT's quantizers log a "consider pre-processing" warning (and progress) at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def fold_weight_transposes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every 2-D ``Transpose`` of an initializer by the transposed initializer (named as the Transpose's
    output), in place; the original stays only while another node reads it (a tied embedding's Gather)."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    keep, folded = [], []
    for node in graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if node.op_type == "Transpose" and node.input[0] in inits and perm in ([], [[1, 0]]):
            w = numpy_helper.to_array(inits[node.input[0]])
            if w.ndim == 2:
                folded.append(numpy_helper.from_array(w.T.copy(), node.output[0]))
                uses[node.input[0]] -= 1
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    left = [t for t in graph.initializer if uses.get(t.name, 0) > 0]
    del graph.initializer[:]
    graph.initializer.extend(left + folded)
    return proto


def quantize_lm_graph(proto: onnx.ModelProto, scheme: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """(the quantized with-past graph, the tool record for the manifest); see the module docstring."""
    import onnxruntime
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    assert scheme in ("int8", "int4"), scheme  # MODES holds the rest; check_scheme refuses them
    bits = 8 if scheme == "int8" else 4
    proto = fold_weight_transposes(proto)
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_GROUP, is_symmetric=True, accuracy_level=4, bits=bits,
                                          op_types_to_quantize=("MatMul",))
    with _quiet_root():
        quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
        quantizer.process()
    return quantizer.model.model, {"name": "onnxruntime.quantization.MatMulNBitsQuantizer", "op": "MatMulNBits",
                                   "onnxruntime": onnxruntime.__version__, "bits": bits, "block_size": INT4_GROUP,
                                   "is_symmetric": True, "accuracy_level": 4}
