"""Quantization schemes of export bundles, the same names for every runtime (``quantize=`` in
``export_onnx`` / ``export_executorch``, ``crisp-edge export --quantize``), and the manifest record that
says what a bundle's weights and activations are.

    int8   int8 weights, symmetric, one scale per output channel; activations quantized to int8
           dynamically at run time (per tensor in ONNX Runtime's MatMulInteger path, per token in
           XNNPACK's dynamically quantized linear). The standard mobile recipe of both runtimes:
           ``onnxruntime.quantization.quantize_dynamic(per_channel=True)`` and ExecuTorch's
           ``XNNPACKQuantizer`` with ``get_symmetric_quantization_config(is_per_channel=True,
           is_dynamic=True)``. Dynamic activations need no calibration data.

Which modes take which scheme is each runtime's own table (``MODES`` in ``export/onnx/quantize.py`` and
``export/executorch/quantize.py``): ``dense`` today. A factored or swappable bundle computes its weights
from the bases and mixers at run time (every forward, or every task switch); each runtime module says in
``REFUSALS`` why it cannot run those weights through its integer kernels, measured in
``bench/results/quantize.json`` (``swappable_int8``): ONNX Runtime's MatMulInteger cannot pre-pack a
weight fed as an input, and an int8 switch is a float32 fold plus a per-channel requantization; XNNPACK
packs a quantized linear's int8 weights once, at load (a buffer included), so a ``set_task`` writing them
would be ignored by its kernels. A request a runtime cannot honour is refused with that reason and what to
use instead, never exported in float silently.
"""
from __future__ import annotations

from typing import Any

from crisp_edge.errors import ConfigError
from crisp_edge.export.errors import BundleError

#: scheme -> what it does to weights and activations (recorded in the manifest).
SCHEMES: dict[str, dict[str, str]] = {
    "int8": {"weights": "int8, symmetric, per output channel",
             "activations": "int8, quantized dynamically at run time (no calibration data)",
             "dtype": "int8"},
}


#: What to use instead of a quantized bundle whose weights change at run time.
INSTEAD = ("For one task, apply its mixer file and export mode='dense' with quantize='int8' (one int8 bundle per "
           "task); to switch tasks on device, export a float32 swappable bundle.")


def check_scheme(quantize: str | None, mode: str, runtime: str, modes: dict[str, tuple[str, ...]],
                 reasons: dict[str, str] | None = None) -> str | None:
    """``quantize`` if ``runtime`` can export it in ``mode`` (``modes``: scheme -> modes it supports);
    otherwise a ``ConfigError`` with the runtime's reason for that mode (``reasons``) and what to use."""
    if quantize is None:
        return None
    if quantize not in SCHEMES:
        raise ConfigError(f"quantize must be one of {sorted(SCHEMES)} (or None for float32), got {quantize!r}.")
    if mode not in modes.get(quantize, ()):
        why = (reasons or {}).get(mode) or (
            f"A {mode!r} bundle computes its weights from the bases and mixers at run time, in float32.")
        raise ConfigError(f"{runtime}: quantize={quantize!r} is available for mode(s) {modes.get(quantize, ())} only. "
                          f"{why} {INSTEAD}")
    return quantize


def quantize_record(scheme: str, tool: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``quantize`` record: the scheme, what it means, and the tool that applied it."""
    return {"scheme": scheme, **SCHEMES[scheme], "tool": tool}


def check_quantize_record(meta: dict, where: str) -> str | None:
    """The scheme of a manifest's optional ``quantize`` record (``None``: a float bundle)."""
    rec = meta.get("quantize")
    if rec is None:
        return None
    if not isinstance(rec, dict) or rec.get("scheme") not in SCHEMES:
        raise BundleError(f"{where}: 'quantize' must be null or an object whose 'scheme' is one of {sorted(SCHEMES)}; "
                          f"found {rec!r:.200}.")
    return rec["scheme"]
