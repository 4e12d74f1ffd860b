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
- ``qlinear(x, w, bias, n)``: an int8 linear (x quantized per token at run time, int8 weights per output channel)
  reading ``w``, one int8 buffer in crisp-edge's packed layout (``kernels/qlinear.h``), in place: XNNPACK packs a
  quantized linear's weights once, at load, so a ``set_task`` writing them would be ignored; this reads them as
  they are. ``fold_quant_(weights, codes, mixers, d_in)`` is ``fold_`` for those buffers over an int8 basis (its
  codes stored transposed, (r, u), each term's scale already multiplied into the mixers): each layer's weight
  folded and quantized into its packed buffer (an int8 swappable bundle's ``set_task``).
"""
from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

import torch

from crisp_edge.export import fold_kernel
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


# qlinear(x, w, bias, n): an int8 linear over a weight buffer in crisp-edge's packed layout (kernels/qlinear.h), read
# in place (kernels/qlinear.cpp): x quantized per row to uint8 with a zero point at run time (as XNNPACK's qd8),
# int8 per-output-channel weights. The reference below is the kernel's arithmetic (float64 sums of integers).
_lib.define("qlinear(Tensor x, Tensor w, Tensor? bias, int n) -> Tensor")
_lib.define("qlinear.out(Tensor x, Tensor w, Tensor? bias, int n, *, Tensor(a!) out) -> Tensor(a!)")
QBLOCK, QGROUP = 16, 4  # outputs per packed block, input channels per packed group (kernels/qlinear.h)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes as float, scale, zero point) per row of ``x`` (..., K), as the kernel quantizes them."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    inv = 1 / scale
    zero = torch.round(-lo * inv).clamp(0, 255)
    return (torch.round(x * inv) + zero).clamp(0, 255), scale, zero


def _qlinear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    codes, scale, zero = quantize_rows(x.float())
    wq, scales, sums = unpack_int8(w, n, x.shape[-1])
    acc = codes.double() @ wq.double().T - zero.double() * sums.double()
    y = (acc * (scale.double() * scales.double())).float()
    return y + bias if bias is not None else y


torch.library.impl(_lib, "qlinear", "CompositeExplicitAutograd")(_qlinear)


@torch.library.impl(_lib, "qlinear.out", "CompositeExplicitAutograd")
def _qlinear_out(x, w, bias, n, *, out):
    out.copy_(_qlinear(x, w, bias, n))
    return out


@torch.library.register_fake(f"{NAMESPACE}::qlinear")
def _qlinear_fake(x, w, bias, n):
    return x.new_empty((*x.shape[:-1], n))


def _codes_shape(n: int, k: int) -> tuple[int, int, int]:
    return (-(-n // QBLOCK), -(-k // QGROUP), QBLOCK * QGROUP)


def packed_bytes(n: int, k: int) -> int:
    """Bytes of an (n, k) layer's buffer: the codes, (ceil(n / 16), ceil(k / 4), 64), then n scales and n sums."""
    a, b, c = _codes_shape(n, k)
    return a * b * c + 8 * n


def pack_int8(wq: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 (n, k) codes and their float32 (n,) scales -> the layer's buffer (kernels/qlinear.h): block b, group g
    holds wq[16 b + j, 4 g + t] at 4 j + t (zero past n or k), then the scales, then the codes' row sums (int32)."""
    n, k = wq.shape
    nb, g, _ = _codes_shape(n, k)
    padded = torch.zeros(nb * QBLOCK, g * QGROUP, dtype=torch.int8)
    padded[:n, :k] = wq
    codes = padded.reshape(nb, QBLOCK, g, QGROUP).permute(0, 2, 1, 3).reshape(-1)
    sums = wq.to(torch.int32).sum(1, dtype=torch.int32)
    return torch.cat([codes, scales.float().contiguous().view(torch.int8), sums.contiguous().view(torch.int8)])


def unpack_int8(w: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pack_int8``'s inverse: (the (n, k) int8 codes, the float32 scales, the int32 sums)."""
    nb, g, c = _codes_shape(n, k)
    size = nb * g * c
    codes = w[:size].reshape(nb, g, QBLOCK, QGROUP).permute(0, 2, 1, 3).reshape(nb * QBLOCK, g * QGROUP)[:n, :k]
    return codes, w[size:size + 4 * n].view(torch.float32), w[size + 4 * n:size + 8 * n].view(torch.int32)


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """A float (n, k) weight -> its int8 buffer: symmetric per output channel (scale = max |w| / 127, 1 for a zero
    row; codes round(w * (1 / scale)) in -127..127), as XNNPACK's quantizer's per-channel weights."""
    w = w.detach().float()
    amax = w.abs().amax(1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return pack_int8(torch.round(w * (1 / scales)[:, None]).clamp(-127, 127).to(torch.int8), scales)


# fold_quant_(self, codes, mixers, d_in): an int8 swappable bundle's set_task for one CRISP group
# (kernels/fold_quant.cpp). codes: the group's basis as int8, stored transposed (r, u), one symmetric scale per term
# (export/quantize.py basis_codes); mixers (n, r, s): the gated mixers with each term's scale multiplied in (the
# caller's graph does it), so the basis is codes @ diag(scales) and each layer's weight reshape(codes^T @ mixers[i])
# (the codes summed as they are, never dequantized) is quantized per output channel straight into its int8 buffer.
# channel_major: the codes' columns are in export/kernels/fold_core.h's channel-major order
# (crisp_edge.export.fold_kernel.channel_major; 16 | d_out and s | d_in): the kernel folds 16 output channels at once.
_lib.define("fold_quant_(Tensor(a!)[] self, Tensor codes, Tensor mixers, int d_in, bool channel_major) -> ()")


@torch.library.impl(_lib, "fold_quant_", "CompositeExplicitAutograd")
def _fold_quant_(self: list[torch.Tensor], codes: torch.Tensor, mixers: torch.Tensor, d_in: int,
                 channel_major: bool) -> None:
    if channel_major:  # back in product order
        s = mixers.shape[2]
        d_out = codes.shape[1] * s // d_in
        codes = torch.from_numpy(fold_kernel.channel_major(codes.numpy(), d_out, d_in, s, inverse=True))
    basis = codes.float().T  # (u, r): the codes' values, exact in float32
    for w, m in zip(self, mixers):
        w.copy_(quantize_weight((basis @ m).reshape(-1, d_in)))


@torch.library.register_fake(f"{NAMESPACE}::fold_quant_")
def _fold_quant_fake(self: list[torch.Tensor], codes: torch.Tensor, mixers: torch.Tensor, d_in: int,
                     channel_major: bool) -> None:
    return None


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
#: The operators that write a program's buffers in place and return nothing (lowering plans them apart).
IN_PLACE_FOLDS = (FOLD, torch.ops.crisp.fold_quant_.default)


#: crisp-edge's operators as an exported program's graph names them (``non_delegated_ops``) -> the kernel name the
#: runtime registers (what the manifest's ``custom_ops`` lists and a session checks is registered).
KERNEL_NAMES = {
    f"{NAMESPACE}.rowmajor_linear.default": f"{NAMESPACE}::rowmajor_linear.out",
    f"{NAMESPACE}.fold_.default": f"{NAMESPACE}::fold_",  # mutates its arguments: registered under its own name
    f"{NAMESPACE}.qlinear.default": f"{NAMESPACE}::qlinear.out",
    f"{NAMESPACE}.fold_quant_.default": f"{NAMESPACE}::fold_quant_",
}


def crisp_ops(non_delegated_ops: dict[str, dict[str, int]]) -> list[str]:
    """The kernels of crisp-edge's own operators that a program calls (the manifest's ``custom_ops``), from its
    ``non_delegated_ops`` record (method -> graph operator -> count)."""
    found = {op for ops in non_delegated_ops.values() for op in ops if op.startswith(f"{NAMESPACE}.")}
    unknown = sorted(found - set(KERNEL_NAMES))
    if unknown:
        raise ExportError(f"the program calls {unknown}, which custom_ops.KERNEL_NAMES does not name a kernel for.")
    return sorted(KERNEL_NAMES[op] for op in found)


