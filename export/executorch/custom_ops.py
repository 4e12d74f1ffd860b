"""crisp-edge's own ExecuTorch operators: their PyTorch definitions (for export) and their kernels (for the runtime).

A program that uses one of these operators runs only where the kernels are registered: in Python after
:func:`load_kernels` (the exporter's and the session's code call it), in the C++ runner because its build
compiles ``export/executorch/kernels/*.cpp`` in. The kernels live in one shared library built from those
sources with ``export/executorch/kernels/build.sh`` (``make setup`` builds it; a checkout without it builds
it here on first use, which needs g++).

Operators (namespace ``crisp``):

- ``fold_(weights, basis, mixers)``: a swappable bundle's ``set_task`` for one CRISP group: every layer's dense
  weight ``reshape(basis @ mixers[i])`` written in place into the program's buffers, the basis read once.
- ``rowmajor_linear(x, w)``: ``x @ w.T`` with ``w`` read in place in its (d_out, d_in) layout. XNNPACK packs a
  weight that is not a constant on every call; for one token per call (a language model's decode step over a
  swappable bundle's task weights) that packing costs about twice the product, and this kernel skips it.
"""
from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

import torch

from crisp_edge.export.errors import ExportError
from crisp_edge.export.native import build_library, load_library

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"
LIBRARY = KERNELS_DIR / "build" / "libcrisp_et_kernels.so"
NAMESPACE = "crisp"

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define("rowmajor_linear(Tensor x, Tensor w) -> Tensor")
_lib.define("rowmajor_linear.out(Tensor x, Tensor w, *, Tensor(a!) out) -> Tensor(a!)")


@torch.library.impl(_lib, "rowmajor_linear", "CompositeExplicitAutograd")
def _rowmajor_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


@torch.library.impl(_lib, "rowmajor_linear.out", "CompositeExplicitAutograd")
def _rowmajor_linear_out(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    out.copy_(torch.nn.functional.linear(x, w))
    return out


_loaded: ctypes.CDLL | None = None
_lock = threading.Lock()


def kernel_sources() -> list[Path]:
    """The library's sources: kernels/ and export/kernels/ (code shared with other runtimes, e.g. fold_core.h)."""
    shared = KERNELS_DIR.parents[1] / "kernels"
    return [p for d in (KERNELS_DIR, shared) for p in d.glob("*.[ch]*") if p.is_file()]


def build_kernels(out: Path = LIBRARY) -> Path:
    """Compile the kernels into ``out`` with ``kernels/build.sh`` (g++ and the executorch wheel's headers)."""
    return build_library(lambda tmp: ["bash", str(KERNELS_DIR / "build.sh"), sys.executable, str(tmp)], out,
                         "crisp-edge's ExecuTorch kernels")


def load_kernels() -> Path:
    """Register crisp-edge's ExecuTorch kernels in this process's ExecuTorch runtime (once; builds them if needed).

    Returns the library's path. Raises ``ExportError`` when the library cannot be built or loaded.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            # RTLD_GLOBAL: the library's static registrations go into the libexecutorch.so that Python's
            # ExecuTorch runtime (executorch.extension.pybindings) already links.
            _loaded = load_library(LIBRARY, kernel_sources(), build_kernels, "crisp-edge's ExecuTorch kernels",
                                   mode=ctypes.RTLD_GLOBAL)
        return LIBRARY


# fold_(self, basis, mixers): a swappable bundle's set_task for one CRISP group in one kernel call (kernels/fold.cpp).
# self: the group's n layers' dense weights, each written as the row-major reshape of basis @ mixers[i] (basis
# (u, r), mixers (n, r, s) already gated); the basis is read once for every layer, and the weights are written in
# place, so ExecuTorch's write-back copy of each rebuilt weight goes (the op mutates the mutable buffers itself).
_lib.define("fold_(Tensor(a!)[] self, Tensor basis, Tensor mixers) -> ()")


@torch.library.impl(_lib, "fold_", "CompositeExplicitAutograd")
def _fold_(self: list[torch.Tensor], basis: torch.Tensor, mixers: torch.Tensor) -> None:
    for w, m in zip(self, mixers):
        w.copy_((basis @ m).reshape(w.shape))


@torch.library.register_fake(f"{NAMESPACE}::fold_")
def _fold_fake(self: list[torch.Tensor], basis: torch.Tensor, mixers: torch.Tensor) -> None:
    return None


FOLD = torch.ops.crisp.fold_.default


#: crisp-edge's operators as an exported program's graph names them (``non_delegated_ops``) -> the kernel name the
#: runtime registers (what the manifest's ``custom_ops`` lists and a session checks is registered).
KERNEL_NAMES = {
    f"{NAMESPACE}.rowmajor_linear.default": f"{NAMESPACE}::rowmajor_linear.out",
    f"{NAMESPACE}.fold_.default": f"{NAMESPACE}::fold_",  # mutates its arguments: registered under its own name
}


def crisp_ops(non_delegated_ops: dict[str, dict[str, int]]) -> list[str]:
    """The kernels of crisp-edge's own operators that a program calls (the manifest's ``custom_ops``), from its
    ``non_delegated_ops`` record (method -> graph operator -> count)."""
    found = {op for ops in non_delegated_ops.values() for op in ops if op.startswith(f"{NAMESPACE}.")}
    unknown = sorted(found - set(KERNEL_NAMES))
    if unknown:
        raise ExportError(f"the program calls {unknown}, which custom_ops.KERNEL_NAMES does not name a kernel for.")
    return sorted(KERNEL_NAMES[op] for op in found)


