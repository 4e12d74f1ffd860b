"""crisp-edge's fused fold kernel as a plain C library (export/fold_kernel.py, export/kernels/fold_core.h: the
arithmetic of ExecuTorch's crisp::fold_ too) against float64 products, the basis in either layout, at sizes
that reach every tail: rows past a multiple of 4 (and of 16, the transposed basis' pass), columns past a
multiple of 16, s that does and does not divide 16, and a basis long enough that the transposed path fetches
ahead for part of it."""
from __future__ import annotations

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
