"""The calibration-whitened factors of a CRISP group (``init_student(..., init="svd-whitened")``): the shared
basis and coefficients that minimise the layers' output error on calibration inputs,
``sum_i ||(W_i - W'_i) X_i^T||^2 = sum_i tr(D_i G_i D_i^T)`` (``G_i = X_i^T X_i``), where the plain SVD init
minimises the weights' error ``sum_i ||W_i - W'_i||^2`` and so spends rank on input directions the data never
excites.

Where the group's layout puts a layer's whole input dimension on one side of the fold, this is Stage 1 of
the LLaMA path (``basis_reduction``), reused as is:

* ``s = d_in`` (an output-side basis, the input weighting acts on the mixers' side): ``principal_basis``,
  exactly optimal;
* transposed with ``s = d_out`` (an input-side basis): Basis Sharing's shared whitening
  ``S S^T = mean_i Sigma_i`` (``principal_basis``), then each layer's coefficients re-solved against its own
  inputs (``resolve_coefficients``).

A fold with ``s < d_in`` (the project's ``s = 4``: a folded row holds ``s`` consecutive inputs of one output
row) splits the input dimension between the basis side and the mixer side, and ``G_i`` couples folded rows,
so no whitening of the fold is exact. There the factors come from alternating least squares on the exact
weighted objective, started from the plain SVD: each step is an exact minimiser (the coefficients of each
layer given the basis; the basis given the coefficients, one linear system shared by every output row), so
the result is never worse than the plain SVD's on the calibration inputs.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.method.convert import crisp_bases
from crisp_edge.method.layer import fold_weight
from crisp_edge.training.compress.basis_reduction import (
    principal_basis,
    resolve_coefficients,
)
from crisp_edge.training.compress.linear_stats import GRAM_RIDGE, LinearInputStats
from crisp_edge.training.retrofit import best_rank_factors

#: Most alternating steps, and the relative drop of the weighted error below which they stop.
ALS_STEPS = 30
ALS_TOL = 1e-4


def whitenable(model: nn.Module) -> bool:
    """Whether every group of a CRISP model has a layout ``whitened_factors`` supports (all but transposed
    groups with ``s < d_out``): the whitened init is the default only then."""
    return all(not b.transpose or b.s == b.d_out for b in crisp_bases(model).values())


def calibration_grams(calib_inputs: LinearInputStats | None, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The input Gram matrices of layers ``names`` from ``calib_inputs``, or a ConfigError saying what is missing."""
    if not isinstance(calib_inputs, LinearInputStats):
        raise ConfigError("init='svd-whitened' needs calib_inputs: capture_linear_inputs(teacher, batches) on a few "
                          "calibration batches (or init='svd' for the data-free init).")
    missing = sorted(set(names) - set(calib_inputs.gram))
    if missing:
        raise ConfigError(f"calib_inputs has no inputs of {missing[:3]}{'...' if len(missing) > 3 else ''}: capture "
                          "them on this teacher (capture_linear_inputs(teacher, batches)).")
    return {n: calib_inputs.gram[n] for n in names}


def weighted_error(targets: list[torch.Tensor], approx: list[torch.Tensor], grams: list[torch.Tensor]) -> float:
    """``sum_i tr((W_i - W'_i) G_i (W_i - W'_i)^T)``: the summed squared output error of the dense weights
    ``approx`` against ``targets`` on the inputs whose Gram matrices ``X_i^T X_i`` are ``grams``."""
    total = 0.0
    for w, a, g in zip(targets, approx, grams):
        d = a.double() - w.double()
        total += float(((d @ g.double()) * d).sum())
    return total


@torch.no_grad()
def whitened_factors(targets: list[torch.Tensor], grams: list[torch.Tensor], s: int, transpose: bool,
                     rank: int, steps: int = ALS_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``P (u x rank), Q (rank x n*s)`` whose product approximates the group's folded weights
    ``[fold(W_1) ... fold(W_n)]`` (``targets``: dense ``(d_out, d_in)``) with the least output error on the
    calibration inputs of Gram matrices ``grams`` (``X_i^T X_i``, ``d_in x d_in``), in the layout
    ``(s, transpose)`` of ``crisp_edge.method.layer.fold_weight``. See the module docstring for the method
    per layout; ``steps`` caps the alternating steps where they are used."""
    d_out, d_in = targets[0].shape
    u = d_out * d_in // s
    folded = [fold_weight(t.double(), u, s, transpose) for t in targets]
    sigmas = [g.double() for g in grams]
    if rank >= min(u, len(targets) * s):  # full capacity: the plain factorisation is already exact
        return best_rank_factors(torch.cat(folded, 1), rank)
    if transpose:
        if s != d_out:
            raise ConfigError(f"the whitened init of a transposed group needs s = d_out ({d_out}), got s={s}; "
                              "use init='svd' for this layout.")
        basis, _ = principal_basis(folded, sigmas, rank, transpose=True)
        return basis, torch.cat(resolve_coefficients(basis, folded, sigmas), 1)
    if s == d_in:
        basis, coeffs = principal_basis(folded, sigmas, rank)
        return basis, torch.cat(coeffs, 1)
    return _alternate(folded, sigmas, d_out, d_in // s, s, *best_rank_factors(torch.cat(folded, 1), rank), steps)


def _solve_psd(h: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``h^-1 rhs`` for a symmetric positive semi-definite ``h`` (a relative ridge, as on a Gram matrix)."""
    ridge = GRAM_RIDGE * float(h.diagonal().mean().clamp_min(1e-30))
    return torch.linalg.solve(h + ridge * torch.eye(h.shape[0], dtype=h.dtype, device=h.device), rhs)


def _alternate(folded: list[torch.Tensor], sigmas: list[torch.Tensor], d_out: int, m: int, s: int,
               p: torch.Tensor, q: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating least squares for an untransposed fold with ``d_in = m * s``: the basis seen as
    ``beta (d_out, m, r)`` (folded row ``(o, j)``, component ``k``), layer i's coefficients ``C_i (r, s)``,
    its dense estimate ``W'_i[o, j*s + c] = sum_k beta[o, j, k] C_i[k, c]``."""
    r = p.shape[1]
    g4 = [g.view(m, s, m, s) for g in sigmas]
    wg = [(f.reshape(d_out, m * s) @ g).view(d_out, m, s) for f, g in zip(folded, sigmas)]  # W_i G_i
    const = sum(float((f.reshape(d_out, m * s) * w.reshape(d_out, m * s)).sum()) for f, w in zip(folded, wg))
    beta, cs = p.reshape(d_out, m, r), list(q.split(s, dim=1))
    last = float("inf")
    for _ in range(steps):
        # the coefficients given the basis: per layer, r*s normal equations
        flat = beta.reshape(d_out, m * r)
        pk = [(beta[:, :, k].T @ flat).view(m, m, r) for k in range(r)]  # sum_o beta[o,j,k] beta[o,J,K]
        for i, (g, w) in enumerate(zip(g4, wg)):
            h = torch.stack([torch.einsum("jJK,jcJC->cKC", pk[k], g) for k in range(r)]).reshape(r * s, r * s)
            cs[i] = _solve_psd(h, torch.einsum("ojk,ojc->kc", beta, w).reshape(r * s)).view(r, s)
        # the basis given the coefficients: one (m*r) system, the same for every output row o
        h = sum(torch.einsum("kc,jcJC,KC->jkJK", c, g, c) for c, g in zip(cs, g4)).reshape(m * r, m * r)
        rhs = sum(torch.einsum("ojc,kc->ojk", w, c) for w, c in zip(wg, cs)).reshape(d_out, m * r)
        flat = _solve_psd(h, rhs.T).T
        err = const - float((flat * rhs).sum())  # the minimum of the basis step's quadratic
        q_, r_ = torch.linalg.qr(flat.reshape(d_out * m, r))  # orthonormal basis columns keep the steps well posed
        beta, cs = q_.view(d_out, m, r), [r_ @ c for c in cs]
        if last - err <= ALS_TOL * max(const, 1e-300):
            break
        last = err
    return beta.reshape(d_out * m, r), torch.cat(cs, 1)
