"""crisp_edge.export: the deploy side (ONNX Runtime and ExecuTorch exporters, export bundles).

This folder is the top-level ``export/`` of the repository, installed as ``crisp_edge.export``
(see pyproject.toml): a bare top-level module named ``export`` would collide with an unrelated
package of that name on PyPI.

ExecuTorch (``export_executorch``): the same three modes as ``.pte`` programs (XNNPACK or portable),
per-task ``.ptd`` files (``add_executorch_task``), ``EtCrispSession``, and a C++ runner in
``export/executorch/runner``. Parity for both runtimes: ``check_bundle`` / ``check_outputs`` (``parity``).

ONNX Runtime (``export_onnx``): ``dense``, ``factored`` and ``swappable`` bundles; per-task
``.onnx_adapter`` files (``mixers_to_onnx_adapter``); ``OnnxCrispSession`` runs a bundle and switches
tasks; ``validate_bundle`` checks parity with the PyTorch reference. Importing this package does not
import onnx or onnxruntime; the names below load them on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "export_onnx": "onnx_export", "Bundle": "bundle", "load_bundle": "bundle",
    "mixers_to_onnx_adapter": "onnx_adapter", "remove_task": "onnx_adapter",
    "OnnxCrispSession": "onnx_runtime", "DEFAULT_TASK": "onnx_runtime",
    "validate_bundle": "validate", "ParityReport": "validate", "ATOL_FP32": "validate",
    "AdapterError": "errors", "BundleError": "errors", "ExportError": "errors", "NoTaskError": "errors",
    "ParityError": "errors",
    "check_bundle": "parity", "check_outputs": "parity", "recompute_reference": "parity",
    "tolerance_for": "parity", "write_reports": "parity_report",
    "export_executorch": "et_export", "load_et_bundle": "et_bundle", "EtBundle": "et_bundle",
    "EtCrispSession": "et_runtime", "add_executorch_task": "et_tasks", "export_with_optimum": "onnx_optimum",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
