"""crisp_edge.export: the deploy side (ONNX Runtime and ExecuTorch exporters, export bundles, parity).

This folder is the top-level ``export/`` of the repository, installed as ``crisp_edge.export``
(see pyproject.toml): a bare top-level module named ``export`` would collide with an unrelated
package of that name on PyPI. Its layout (docs/architecture.md):

    bundle.py       the runtime-neutral bundle contract and the runtime registry (imports no runtime)
    model_io.py     what both exporters need of a PyTorch model (inputs, logits wrapper)
    flatbuffer.py   the strict FlatBuffers reader behind both runtimes' task-file checks
    onnx/           ONNX Runtime: export (dense / factored / swappable), fold graph, .onnx_adapter, session
    executorch/     ExecuTorch: .pte export, .ptd task files, session, and the C++ runner (runner/)
    parity/         reference outputs, tolerances, checks of any bundle, reports

Importing this package imports no runtime; the names below load theirs on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {
    # the runtime-neutral bundle contract
    "Bundle": "bundle", "open_bundle": "bundle", "register_runtime": "bundle", "Runtime": "bundle",
    "AdapterError": "errors", "BundleError": "errors", "ExportError": "errors", "NoTaskError": "errors",
    "ParityError": "errors",
    # ONNX Runtime
    "export_onnx": "onnx.export", "load_bundle": "onnx.bundle", "OnnxBundle": "onnx.bundle",
    "mixers_to_onnx_adapter": "onnx.adapter", "remove_task": "onnx.adapter",
    "OnnxCrispSession": "onnx.session", "DEFAULT_TASK": "onnx.session", "export_with_optimum": "onnx.optimum",
    # ExecuTorch
    "export_executorch": "executorch.export", "load_et_bundle": "executorch.bundle", "EtBundle": "executorch.bundle",
    "EtCrispSession": "executorch.session", "add_executorch_task": "executorch.tasks",
    # parity
    "validate_bundle": "parity.validate", "ParityReport": "parity.validate", "ATOL_FP32": "parity.validate",
    "check_bundle": "parity.check", "check_outputs": "parity.check", "recompute_reference": "parity.check",
    "tolerance_for": "parity.check", "write_reports": "parity.report",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
