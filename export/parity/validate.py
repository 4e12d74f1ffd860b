"""Parity of an export bundle with its PyTorch reference: the exporters' entry point.

A thin layer over ``check.py`` and ``compare.py`` (one parity library for every runtime): the names
here (``validate_bundle``, ``ParityReport``, ``Comparison``, ``compare``, ``ATOL_FP32``,
``MIN_COSINE``, ``reference_cases``) are the ones ``export_onnx``, the tests and the README use.
``validate_bundle`` runs the bundle in its runtime on the fixed seeded inputs of ``reference.npz``
and compares every output of every case and task with the PyTorch outputs recorded at export;
it raises one ``ParityError`` naming the fault (typed loader errors such as ``BundleError`` or
``AdapterError`` propagate as they are). ``export_onnx`` calls it before the bundle is moved into place.
"""
from __future__ import annotations

import os

import numpy as np
from crisp_edge.export.bundle import open_bundle
from crisp_edge.export.parity.check import check_bundle
from crisp_edge.export.parity.compare import (
    ATOL_FP32,
    MIN_COSINE,
    Comparison,
    ParityReport,
    compare,
)
from crisp_edge.export.parity.reference import read_bundle_reference

__all__ = ["ATOL_FP32", "MIN_COSINE", "Comparison", "ParityReport", "compare", "reference_cases", "validate_bundle"]


def reference_cases(bundle) -> tuple[list[dict[str, np.ndarray]], dict[str, list[dict[str, np.ndarray]]]]:
    """The stored inputs (one dict per case) and reference outputs per task."""
    ref = read_bundle_reference(bundle.path, bundle.manifest)
    return ref.inputs, ref.outputs


def validate_bundle(bundle, *, threads: int = 1, atol: float | None = None,
                    raise_on_failure: bool = True) -> ParityReport:
    """Run ``bundle`` (a loaded bundle or a folder) in its runtime against its stored PyTorch
    reference; raise ``ParityError`` on any mismatch (``raise_on_failure``), or return the report."""
    if isinstance(bundle, (str, os.PathLike)):
        _, bundle = open_bundle(bundle)
    return check_bundle(bundle, threads=threads, atol=atol, raise_on_failure=raise_on_failure, raise_errors=True)
