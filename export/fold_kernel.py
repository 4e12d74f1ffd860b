"""crisp-edge's fused fold kernel for runtimes without an operator for it (ONNX Runtime's Python session).

One call folds a CRISP group: every layer's ``B @ G(A_i)`` in its ``(u, s)`` layout, the basis read once
(``export/kernels/fold_core.h``, the same code as ExecuTorch's ``crisp::fold_``). It is a small shared library
built from ``export/kernels/fold_c.cpp`` with g++ on first use (``make setup`` builds it) and called through
ctypes; where it cannot be built, :func:`kernel` returns None and callers keep their runtime's own fold.

:func:`fold_quant_group` is the same fold fused with symmetric per-output-channel int8 quantization (a swappable
int8 bundle's task switch): a few output channels at a time are folded into a float scratch that stays in cache
and quantized from there into the int8 ``(d_in, d_out)`` layout ONNX Runtime's ``MatMulInteger`` takes, with one
float scale per output channel, so the float weights never go to memory.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from crisp_edge.export.errors import ExportError
from crisp_edge.export.native import build_library, load_library

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"
LIBRARY = KERNELS_DIR / "build" / "libcrisp_fold.so"
SOURCES = (KERNELS_DIR / "fold_c.cpp", KERNELS_DIR / "fold_core.h")

_lock = threading.Lock()
_state: dict = {}


def build(out: Path = LIBRARY, flags: tuple[str, ...] = (), source: Path = SOURCES[0]) -> Path:
    """Compile ``fold_c.cpp`` into ``out`` (whole or not at all), with extra compiler ``flags`` (tests build
    ``-DCRISP_FOLD_NO_MULTIVERSION`` variants); an ``ExportError`` saying why when it cannot. ``source``: another
    copy of ``fold_c.cpp`` (``bench_fold_layouts.py --baseline`` builds an earlier commit's beside this one)."""
    return build_library(lambda tmp: ["g++", "-std=c++17", "-O3", "-fopenmp-simd", *flags, "-shared", "-fPIC", "-o",
                                      str(tmp), str(source)], out, "crisp-edge's fold kernel")


def _load() -> ctypes.CDLL:
    return bind(load_library(LIBRARY, SOURCES, build, "crisp-edge's fold kernel"))


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (a build of ``fold_c.cpp``) with its entry points' argument and result types set."""
    f = lib.crisp_fold_group
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p)]
    for q in (lib.crisp_fold_quant_group, lib.crisp_fold_quant_group_i8):
        q.restype = ctypes.c_int
        q.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p),
                      ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded library (built if needed, once per process), or None where it cannot be built or loaded
    (``error()`` says why)."""
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"], _state["error"] = _load(), None
            except ExportError as e:
                _state["lib"], _state["error"] = None, str(e)
        return _state["lib"]


def error() -> str | None:
    """Why :func:`kernel` returned None (None when it did not, or was not asked yet)."""
    return _state.get("error")


def _operands(basis: np.ndarray, gated: np.ndarray, transposed: bool, what: str):
    """(library, basis, gated, u, r, n, s), checked."""
    lib = kernel()
    if lib is None:
        raise ExportError(f"crisp-edge's fold kernel is not available: {error()}")
    int8 = what == "fold_quant_group" and basis.dtype == np.int8
    if (basis.dtype != np.float32 and not int8) or gated.dtype != np.float32 or basis.ndim != 2 or gated.ndim != 3:
        raise ExportError(f"{what} takes a float32 basis (2-D; fold_quant_group also int8 codes) and float32 gated "
                          "mixers (n, r, s).")
    basis, gated = np.ascontiguousarray(basis), np.ascontiguousarray(gated)
    r, u = basis.shape if transposed else basis.shape[::-1]
    n, gr, s = gated.shape
    if gr != r:
        raise ExportError(f"{what}: the mixers' r ({gr}) is not the basis' ({r}).")
    return lib, basis, gated, u, r, n, s


def _writable(arrays: list[np.ndarray], n: int, shape: tuple, dtype, what: str) -> None:
    if len(arrays) != n or any(a.shape != shape or a.dtype != dtype or not a.flags.c_contiguous
                               or not a.flags.writeable for a in arrays):
        raise ExportError(f"{what} must be {n} writable C-contiguous {np.dtype(dtype).name} arrays of shape {shape}.")


def fold_group(basis: np.ndarray, gated: np.ndarray, transposed: bool,
               outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Every layer's ``(u, s)`` product ``B @ gated[i]`` (float32) of one group: ``basis`` (u, r), or (r, u) when
    ``transposed``; ``gated`` the gated mixers (n, r, s). Written into ``outs`` (n C-contiguous float32 (u, s)
    arrays) when given, else into new arrays; returns them."""
    lib, basis, gated, u, r, n, s = _operands(basis, gated, transposed, "fold_group")
    if outs is None:
        outs = [np.empty((u, s), np.float32) for _ in range(n)]
    else:
        _writable(outs, n, (u, s), np.float32, "fold_group: outs")
    ptrs = (ctypes.c_void_p * n)(*[o.ctypes.data for o in outs])
    if lib.crisp_fold_group(basis.ctypes.data, u, r, int(transposed), gated.ctypes.data, n, s, ptrs) != 0:
        raise ExportError(f"crisp-edge's fold kernel refused the sizes u={u} r={r} n={n} s={s}.")
    return outs


#: Output channels whose product rows a channel-major basis keeps together (fold_core.h's QCH).
CHANNEL_BLOCK = 16


def channel_major_fits(d_out: int, d_in: int, s: int) -> bool:
    """Whether a group of (d_out, d_in) layers with s mixer columns can store its basis channel-major."""
    return d_out % CHANNEL_BLOCK == 0 and d_in % s == 0


def channel_major(basis: np.ndarray, d_out: int, d_in: int, s: int, inverse: bool = False) -> np.ndarray:
    """A transposed basis (r, u) with its columns in channel-major order (``export/kernels/fold_core.h``: column
    ``(o // 16) * (d_in // s) * 16 + q * 16 + o % 16`` holds product row ``o * (d_in // s) + q``, so that a fold
    pass reads 16 output channels' rows at one input position together), or back with ``inverse``. The
    permutation is its own inverse on the (r, d_out // 16, ., .) view: the two middle axes swap."""
    r, u = basis.shape
    if not channel_major_fits(d_out, d_in, s) or u * s != d_out * d_in:
        raise ExportError(f"a ({r}, {u}) basis of ({d_out}, {d_in}) layers with s={s} cannot be channel-major "
                          f"(needs {CHANNEL_BLOCK} | d_out and s | d_in).")
    nq = d_in // s
    shape = (r, d_out // CHANNEL_BLOCK, nq, CHANNEL_BLOCK) if inverse else (r, d_out // CHANNEL_BLOCK, CHANNEL_BLOCK, nq)
    return np.ascontiguousarray(basis.reshape(shape).transpose(0, 1, 3, 2).reshape(r, u))


def _aligned_codes(d_in: int, d_out: int) -> np.ndarray:
    """An empty (d_in, d_out) int8 array starting on a 64-byte boundary (a cache line: with 64 | d_out every row
    does, and the channel-major kernel writes whole lines without reading them first)."""
    raw = np.empty(d_in * d_out + 64, np.int8)
    start = -raw.ctypes.data % 64
    return raw[start:start + d_in * d_out].reshape(d_in, d_out)


def fold_quant_group(basis: np.ndarray, gated: np.ndarray, transposed: bool, d_out: int, d_in: int,
                     outs: tuple[list[np.ndarray], list[np.ndarray]] | None = None, cm: bool = False,
                     qmax: int = 127) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(codes, scales) of every layer of one group: layer i's weight W_i (d_out, d_in), the row-major reshape of
    ``B @ gated[i]`` (operands as :func:`fold_group`'s), quantized symmetric per output channel: ``scales[i][o]`` =
    max |W_i[o]| / qmax (1 for an all-zero channel) and ``codes[i]`` (d_in, d_out) int8 = round-half-even(W_i /
    scale)^T, in -qmax..qmax (the fold's float32 values times qmax / max: a value a rounding away from a half may
    round the other way than exact arithmetic would). ``qmax``: 127, or 64 for ONNX Runtime's 7-bit weights
    (``onnx/quantize.py`` ``WEIGHT_QMAX``). Written into ``outs`` (codes, scales) when given. ``basis``
    may be int8 codes: the product is then taken with them as they are (multiply each term's scale into
    ``gated`` first). ``cm``: the basis is stored transposed in :func:`channel_major` order (the same codes and
    scales, folded 16 channels at a time: no transpose of the codes)."""
    lib, basis, gated, u, r, n, s = _operands(basis, gated, transposed, "fold_quant_group")
    if d_out * d_in != u * s or d_out <= 0:
        raise ExportError(f"fold_quant_group: a ({d_out}, {d_in}) weight is not the ({u}, {s}) product reshaped.")
    if not 1 <= qmax <= 127:
        raise ExportError(f"fold_quant_group: qmax must be in 1..127 (int8 codes), got {qmax}.")
    if cm and not (transposed and channel_major_fits(d_out, d_in, s)):
        raise ExportError(f"fold_quant_group: a channel-major basis is stored transposed, with {CHANNEL_BLOCK} | "
                          f"d_out and s | d_in (got transposed={transposed}, d_out={d_out}, d_in={d_in}, s={s}).")
    if outs is None:
        outs = ([_aligned_codes(d_in, d_out) for _ in range(n)], [np.empty(d_out, np.float32) for _ in range(n)])
    codes, scales = outs
    _writable(codes, n, (d_in, d_out), np.int8, "fold_quant_group: codes")
    _writable(scales, n, (d_out,), np.float32, "fold_quant_group: scales")
    cp = (ctypes.c_void_p * n)(*[c.ctypes.data for c in codes])
    sp = (ctypes.c_void_p * n)(*[c.ctypes.data for c in scales])
    call = lib.crisp_fold_quant_group_i8 if basis.dtype == np.int8 else lib.crisp_fold_quant_group
    if call(basis.ctypes.data, u, r, 2 if cm else int(transposed), gated.ctypes.data, n, s, d_out, d_in, cp, sp,
            int(qmax)) != 0:
        raise ExportError(f"crisp-edge's fold kernel refused the sizes u={u} r={r} n={n} s={s} d_out={d_out}.")
    return codes, scales
