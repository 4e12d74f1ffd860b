"""Quantized ONNX bundles: ONNX Runtime's own dynamic quantization of the inference graph.

``quantize_graph(path, "int8")`` rewrites ``model.onnx`` in place with
``onnxruntime.quantization.quantize_dynamic``: every MatMul / Gemm weight becomes int8 with one scale per
output channel (``per_channel=True``), and activations are quantized at run time
(``DynamicQuantizeLinear`` -> ``MatMulInteger``). Layer norms, biases, embeddings and the convolution
patch embedding stay float32 (ORT's dynamic path quantizes matrix products only).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

#: scheme -> the bundle modes ONNX Runtime can run it in (see crisp_edge.export.quantize).
MODES: dict[str, tuple[str, ...]] = {"int8": ("dense",)}
#: Why the other modes are refused (measured: bench/results/quantize.json, ``swappable_int8``).
REFUSALS: dict[str, str] = {
    "swappable": "A swappable int8 bundle would feed MatMulInteger its int8 weights and scales as inputs, which "
                 "ONNX Runtime cannot pre-pack (slower than int8 dense on every forward), and each task switch "
                 "would be the float32 fold plus a per-channel requantization, more than the int8 forwards a "
                 "switch may cost (bench/results/quantize.json, swappable_int8).",
    "factored": "A factored bundle builds its weights in float32 on every forward; quantizing them there would "
                "add a requantization to every forward.",
}


def quantize_graph(path: Path, scheme: str) -> dict[str, Any]:
    """Quantize the ONNX file at ``path`` in place; returns the tool record for the manifest."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert scheme == "int8", scheme  # the only scheme in MODES; check_scheme refuses the rest
    tmp = path.with_name(f".{path.name}.int8.tmp")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" warning at every call
    try:
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
        os.replace(tmp, path)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)
    return {"name": "onnxruntime.quantization.quantize_dynamic", "onnxruntime": onnxruntime.__version__,
            "per_channel": True, "weight_type": "QInt8", "reduce_range": False}
