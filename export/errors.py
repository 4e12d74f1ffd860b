"""Typed errors of the deploy side. Each subclasses ``crisp_edge.errors.CrispEdgeError``."""
from __future__ import annotations

from crisp_edge.errors import CrispEdgeError, LayoutMismatchError


class ExportError(CrispEdgeError, RuntimeError):
    """An export cannot be made with these settings (unsupported model, input or mode)."""


class BundleError(ExportError):
    """An export bundle is missing, damaged (a hash differs), or not a crisp-edge bundle."""


class ParityError(ExportError):
    """The exported artifact computes something other than the PyTorch reference.

    ``report`` holds every comparison (a ``ParityReport``); the message names the worst one.
    """

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report


class AdapterError(ExportError, LayoutMismatchError):
    """An ``.onnx_adapter`` does not fit the bundle: unknown tensor name, wrong shape or dtype."""


class NoTaskError(ExportError):
    """A swappable session was run before any task was set (its dense weights do not exist yet)."""


class KernelsError(ExportError):
    """A program uses crisp-edge's own ExecuTorch operators and their kernels cannot be registered here."""
