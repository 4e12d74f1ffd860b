"""crisp-edge's fused fold kernel as a plain C library (export/fold_kernel.py, export/kernels/fold_core.h: the
arithmetic of ExecuTorch's crisp::fold_ too) against float64 products, the basis in either layout, at sizes
that reach every tail: rows past a multiple of 4 (and of 16, the transposed basis' pass), columns past a
multiple of 16, s that does and does not divide 16, and a basis long enough that the transposed path fetches
ahead for part of it."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from crisp_edge.export import fold_kernel
from crisp_edge.export.errors import ExportError

pytestmark = pytest.mark.runtime


@pytest.mark.parametrize("u,r,n,s", [(30, 16, 4, 4), (21, 5, 3, 3), (65, 3, 5, 5), (13, 7, 2, 2), (9, 1, 1, 9),
                                     (7, 2, 6, 4), (2100, 16, 4, 4)])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_group_is_the_product_of_every_layer(u, r, n, s, transposed):
    assert fold_kernel.kernel() is not None, fold_kernel.error()
    rng = np.random.default_rng(u * 100 + r)
    basis = rng.standard_normal((u, r)).astype(np.float32)
    gated = rng.standard_normal((n, r, s)).astype(np.float32)
    outs = fold_kernel.fold_group(np.ascontiguousarray(basis.T) if transposed else basis, gated, transposed)
    assert len(outs) == n
    for i, out in enumerate(outs):
        assert out.shape == (u, s) and out.dtype == np.float32
        np.testing.assert_allclose(out, basis.astype(np.float64) @ gated[i], rtol=1e-5, atol=1e-5)


def test_fold_group_refuses_mismatched_inputs():
    with pytest.raises(ExportError, match="r"):
        fold_kernel.fold_group(np.zeros((8, 4), np.float32), np.zeros((2, 3, 4), np.float32), False)
    with pytest.raises(ExportError, match="float32"):
        fold_kernel.fold_group(np.zeros((8, 4)), np.zeros((2, 4, 4), np.float32), False)


def quantize_reference(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (d_in, d_out), scales, distance of each exact w / scale from a rounding tie) of a float64 weight, codes
    in -qmax..qmax."""
    m = np.abs(w).max(axis=1)
    scale = np.where(m > 0, m / qmax, 1.0)
    x = w / scale[:, None]
    return np.clip(np.rint(x), -qmax, qmax).T, scale, np.abs(np.abs(x - np.floor(x)) - 0.5).T


@pytest.mark.parametrize("d_out,d_in,r,n,s", [(24, 20, 16, 4, 4),   # 24 channels: one block of 16 and a tail
                                              (7, 9, 5, 3, 3),      # s = 3 | d_in, odd everything
                                              (6, 6, 3, 2, 4),      # s = 4 does not divide d_in: channels split rows
                                              (33, 64, 2, 1, 16),   # a channel per 4 product rows, 3 blocks
                                              (32, 148, 16, 4, 4),  # inputs: nine tiles of 16, 4 left
                                              (300, 40, 16, 4, 4)])  # u = 3000: the transposed path fetches ahead
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("qmax", [127, 64], ids=["8-bit", "7-bit"])
def test_fold_quant_group_is_the_fold_quantized_per_channel(d_out, d_in, r, n, s, transposed, qmax):
    """Codes and scales against a float64 fold quantized in numpy: scales to float32 rounding, every code equal
    except where the exact value sits within float32 error of a rounding tie (then one step apart at most), each
    within -qmax..qmax (ONNX Runtime's 7-bit weights: 64)."""
    assert fold_kernel.kernel() is not None, fold_kernel.error()
    u = d_out * d_in // s
    rng = np.random.default_rng(d_out * 1000 + d_in)
    basis = rng.standard_normal((u, r)).astype(np.float32)
    gated = rng.standard_normal((n, r, s)).astype(np.float32)
    gated[-1, :, :] = 0  # the last layer all zero: scale 1, codes 0
    codes, scales = fold_kernel.fold_quant_group(np.ascontiguousarray(basis.T) if transposed else basis, gated,
                                                 transposed, d_out, d_in, qmax=qmax)
    assert len(codes) == len(scales) == n
    for i in range(n):
        w = (basis.astype(np.float64) @ gated[i].astype(np.float64)).reshape(d_out, d_in)
        ref, ref_scale, tie = quantize_reference(w, qmax)
        assert codes[i].shape == (d_in, d_out) and codes[i].dtype == np.int8 and scales[i].dtype == np.float32
        np.testing.assert_allclose(scales[i], ref_scale, rtol=1e-5)
        off = codes[i].astype(np.int64) != ref
        assert np.all(np.abs(codes[i].astype(np.int64) - ref) <= 1)
        assert np.all(tie[off] < 1e-3), f"codes differ away from a tie: {np.argwhere(off)[:5]}"
        assert off.mean() < 0.01
        assert i == n - 1 or np.abs(codes[i].astype(np.int64)).max() == qmax  # the largest weight is +-qmax
    assert np.all(codes[-1] == 0) and np.all(scales[-1] == 1)


def test_fold_quant_group_refuses_a_shape_that_is_not_the_product():
    with pytest.raises(ExportError, match="reshaped"):
        fold_kernel.fold_quant_group(np.zeros((4, 8), np.float32), np.zeros((2, 4, 4), np.float32), True, 5, 7)
    codes = ([np.zeros((8, 4), np.int8)] * 2, [np.zeros(3, np.float32)] * 2)
    with pytest.raises(ExportError, match="scales"):
        fold_kernel.fold_quant_group(np.zeros((4, 8), np.float32), np.zeros((2, 4, 4), np.float32), True, 4, 8, codes)
    with pytest.raises(ExportError, match="qmax must be in 1..127"):
        fold_kernel.fold_quant_group(np.zeros((4, 8), np.float32), np.zeros((2, 4, 4), np.float32), True, 4, 8,
                                     qmax=128)


@pytest.mark.parametrize("d_out,d_in,r,n,s", [(24, 20, 16, 4, 4), (7, 9, 5, 3, 3), (300, 40, 16, 4, 4)])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_quant_group_takes_int8_basis_codes(d_out, d_in, r, n, s, transposed):
    """An int8 basis (a swappable int8 bundle's) folds as its codes converted to float: the same codes and scales
    as the float fold of the same integer values."""
    u = d_out * d_in // s
    rng = np.random.default_rng(d_out + d_in)
    codes8 = rng.integers(-127, 128, (u, r)).astype(np.int8)
    gated = (rng.standard_normal((n, r, s)) * 0.01).astype(np.float32)
    b8 = np.ascontiguousarray(codes8.T) if transposed else codes8
    got = fold_kernel.fold_quant_group(b8, gated, transposed, d_out, d_in)
    want = fold_kernel.fold_quant_group(b8.astype(np.float32), gated, transposed, d_out, d_in)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ExportError, match="float32 basis"):
        fold_kernel.fold_group(b8, gated, transposed)


@pytest.mark.parametrize("d_out,d_in,r,n,s", [(32, 148, 16, 4, 4),   # 32 channels: a group of 64 cut short
                                              (128, 40, 16, 4, 4),   # two whole groups of 64
                                              (48, 9, 5, 3, 3),      # s = 3
                                              (16, 64, 2, 1, 16)])   # one block, one layer
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("qmax", [127, 64], ids=["8-bit", "7-bit"])
def test_channel_major_basis_gives_the_same_codes(d_out, d_in, r, n, s, dtype, aligned, qmax):
    """A basis stored channel-major (``fold_kernel.channel_major``, a permutation of its columns) folds to the same
    codes and scales, bit for bit, as the same basis in product order: the same sums in the same order quantized by
    the same arithmetic, whether its rows of codes are written a whole cache line at a time (64 | d_out, codes
    64-byte aligned) or 16 codes at a time."""
    u = d_out * d_in // s
    rng = np.random.default_rng(d_out * 7 + d_in)
    basis = (rng.integers(-127, 128, (r, u)) if dtype == np.int8 else rng.standard_normal((r, u))).astype(dtype)
    gated = (rng.standard_normal((n, r, s)) * 0.01).astype(np.float32)
    want = fold_kernel.fold_quant_group(basis, gated, True, d_out, d_in, qmax=qmax)
    cm = fold_kernel.channel_major(basis, d_out, d_in, s)
    assert cm.shape == basis.shape and not np.array_equal(cm, basis)
    np.testing.assert_array_equal(fold_kernel.channel_major(cm, d_out, d_in, s, inverse=True), basis)
    outs = None if aligned else ([np.empty(d_in * d_out + 1, np.int8)[1:].reshape(d_in, d_out) for _ in range(n)],
                                 [np.empty(d_out, np.float32) for _ in range(n)])
    got = fold_kernel.fold_quant_group(cm, gated, True, d_out, d_in, outs, cm=True, qmax=qmax)
    assert aligned == all(c.ctypes.data % 64 == 0 for c in got[0])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        np.testing.assert_array_equal(a, b)


def test_channel_major_needs_its_shapes():
    gated = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ExportError, match="cannot be channel-major"):
        fold_kernel.channel_major(np.zeros((4, 24), np.float32), 8, 12, 4)  # 16 does not divide d_out
    with pytest.raises(ExportError, match="channel-major basis is stored transposed"):
        fold_kernel.fold_quant_group(np.zeros((16, 4), np.float32), gated, False, 16, 4, cm=True)
    with pytest.raises(ExportError, match="channel-major basis is stored transposed"):
        fold_kernel.fold_quant_group(np.zeros((4, 24), np.float32), gated, True, 8, 12, cm=True)


@pytest.mark.parametrize("flags", [(), ("-mavx2", "-mfma")], ids=["baseline-x86-64", "avx2"])
def test_int8_basis_widening_of_every_build_folds_as_float(flags, tmp_path, monkeypatch):
    """The kernel built for one target alone (-DCRISP_FOLD_NO_MULTIVERSION: the portable widening of an int8
    basis' codes, which an AVX-512 machine's run-time choice never runs) folds int8 codes, -128 included, exactly
    as the same values in float (not bit for bit as another build: without FMA a multiply-add rounds twice)."""
    if "avx2" in flags and "avx2" not in Path("/proc/cpuinfo").read_text(errors="replace"):
        pytest.skip("this CPU cannot run an AVX2 build")
    d_out, d_in, r, n, s = 96, 40, 16, 4, 4  # u = 960: 60 transposed passes of 16 rows, 2 of them fetching ahead
    rng = np.random.default_rng(3)
    codes8 = rng.integers(-128, 128, (r, d_out * d_in // s)).astype(np.int8)
    gated = (rng.standard_normal((n, r, s)) * 0.01).astype(np.float32)
    lib = fold_kernel.bind(ctypes.CDLL(str(fold_kernel.build(tmp_path / "lib.so", ("-DCRISP_FOLD_NO_MULTIVERSION",
                                                                                     *flags)))))
    monkeypatch.setitem(fold_kernel._state, "lib", lib)
    got = fold_kernel.fold_quant_group(codes8, gated, True, d_out, d_in)
    want = fold_kernel.fold_quant_group(codes8.astype(np.float32), gated, True, d_out, d_in)
    cm = fold_kernel.fold_quant_group(fold_kernel.channel_major(codes8, d_out, d_in, s), gated, True, d_out, d_in,
                                      cm=True)  # the portable channel-major quantization too
    for a, b, c in zip(got[0] + got[1], want[0] + want[1], cm[0] + cm[1]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, a)
