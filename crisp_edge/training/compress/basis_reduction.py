"""Alg. 5, Stage 1 for one CRISP group: component importance, the principal re-expression of a basis
(``principal_basis``), reduction to fewer components (``reduce_basis``: keep the top components, or the
paper's importance-weighted k-means merge) and the least-squares re-solve of the coefficients
(``resolve_coefficients``). See ``crisp_edge.training.compress.llama`` for the whole algorithm."""
from __future__ import annotations

import math

import torch

from crisp_edge.errors import ConfigError
from crisp_edge.training.compress.linear_stats import (
    GRAM_RIDGE,
    whitening_factor,
)

#: Stage 1: keep the most important components ("truncate") or merge them by k-means ("cluster").
REDUCTIONS = ("cluster", "truncate")


def importance(basis: torch.Tensor, coeffs: list[torch.Tensor], second_moments: list[torch.Tensor] | None = None,
               transpose: bool = False) -> torch.Tensor:
    """Per component j: ``||b_j|| * sqrt(sum_i ||c_ij||^2)``; with input second moments ``Sigma_i``, the
    component's output RMS: ``||b_j|| * sqrt(sum_i c_ij^T Sigma_i c_ij)`` for an output-side basis
    (``s = d_in``), ``sqrt(sum_i ||c_ij||^2 b_j^T Sigma_i b_j)`` for an input-side one (transposed,
    ``s = d_out``)."""
    b = basis.double()
    if second_moments is None:
        return b.norm(dim=0) * sum(c.double().pow(2).sum(dim=1) for c in coeffs).clamp_min(0).sqrt()
    if transpose:
        energy = sum(((b.T @ m.double()) * b.T).sum(dim=1) * c.double().pow(2).sum(dim=1)
                     for c, m in zip(coeffs, second_moments))
        return energy.clamp_min(0).sqrt()
    energy = sum(((c.double() @ m) * c.double()).sum(dim=1) for c, m in zip(coeffs, second_moments))
    return b.norm(dim=0) * energy.clamp_min(0).sqrt()


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, *, iters: int = 25,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Cluster labels of the rows of ``x`` (importance ``w``) into exactly ``k`` non-empty clusters:
    weighted k-means++ seeding, then Lloyd steps with weighted centroids; an emptied cluster is
    re-seeded with the point that costs the most."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"cannot make {k} clusters of {n} points.")
    if k == n:
        return torch.arange(n, device=x.device)
    w = w.double().clamp_min(1e-30)
    x = x.double()
    first = int(torch.multinomial((w / w.sum()).cpu(), 1, generator=generator))  # the generator is a CPU one
    centers = [x[first]]
    d2 = (x - centers[0]).pow(2).sum(1)
    for _ in range(1, k):
        p = w * d2
        idx = int(torch.multinomial((p / p.sum()).cpu(), 1, generator=generator)) if float(p.sum()) > 0 else int(
            torch.multinomial((w / w.sum()).cpu(), 1, generator=generator))
        centers.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
    c = torch.stack(centers)
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(iters):
        dist = torch.cdist(x, c).pow(2)
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():  # re-seed: the worst-served point
            cost = w * dist.gather(1, new[:, None]).squeeze(1)
            movable = counts[new] > 1
            cost = torch.where(movable, cost, torch.full_like(cost, -1.0))
            j = int(cost.argmax())
            counts[new[j]] -= 1
            new[j] = empty
            counts[empty] = 1
            c[empty] = x[j]
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.zeros_like(c).index_add_(0, labels, w[:, None] * x) / torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(
            0, labels, w)[:, None]
    return labels


def principal_basis(folded: list[torch.Tensor], second_moments: list[torch.Tensor], rank: int,
                    transpose: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A group's rank-``rank`` factors ``(B, [C_i])`` of its folded weights ``M_i`` (``folded``, ``u x s``)
    in the directions that carry the most output variance: exact at full capacity (``rank`` = the
    group's full rank), and truncating them keeps the output-variance-optimal subspace.

    Output-side basis (``s = d_in``, ``M_i = B C_i = W_i``): ``B`` = top-r eigenvectors of the output
    covariance ``K = sum_i M_i Sigma_i M_i^T``, ``C_i = B^T M_i``. Input-side basis (transposed,
    ``s = d_out``, ``M_i = W_i^T``): Basis Sharing's whitening, ``S S^T = mean_i Sigma_i``; ``V`` = top-r
    eigenvectors of ``S^T (sum_i M_i M_i^T) S``, ``B = S^-T V``, ``C_i = V^T S^T M_i``."""
    ms = [m.double() for m in folded]
    mat, sf = _side_gram(ms, [sm.double() for sm in second_moments], transpose)
    v = torch.linalg.eigh(mat)[1].flip(-1)[:, :rank]
    if sf is None:
        return v, [v.T @ m for m in ms]
    new_b = torch.linalg.solve_triangular(sf.T, v, upper=True)  # S^-T V
    return new_b, [v.T @ sf.T @ m for m in ms]


def _side_gram(ms: list[torch.Tensor], second_moments: list[torch.Tensor], transpose: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The symmetric matrix whose leading eigenvectors are a group's principal directions on its side,
    from its folded weights ``M_i`` and input second moments ``Sigma_i`` (float64), and the whitening
    factor ``S`` of an input side (``None`` for an output side). Output side (``M_i = W_i``):
    ``sum_i M_i Sigma_i M_i^T``. Input side (``M_i = W_i^T``): ``S^T (sum_i M_i M_i^T) S`` with
    ``S S^T = mean_i Sigma_i``. Keeping the leading k leaves an error equal to the remaining eigenvalues."""
    if not transpose:
        return sum(m @ sm @ m.T for m, sm in zip(ms, second_moments)), None
    sf = whitening_factor(sum(second_moments) / len(second_moments))
    ws = [sf.T @ m for m in ms]
    return sum(w @ w.T for w in ws), sf


def reduce_basis(basis: torch.Tensor, coeffs: list[torch.Tensor], k: int, *, method: str = "cluster",
                 second_moments: list[torch.Tensor] | None = None, transpose: bool = False, proj_dim: int = 32,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stage 1 for one group: ``(B' (u x k), [C'_i (k x s)])`` from ``B (u x r)`` and gated
    coefficients ``C_i (r x s)``. ``method="cluster"``: Alg. 5 (importance, random-projection
    features, weighted k-means, variance-aware merge, summed coefficients). ``method="truncate"``:
    keep the ``k`` most important components (the top-k SVD directions for a closed-form retrofit:
    Alg. 4's initialisation)."""
    if method not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {method!r}.")
    b = basis.double()
    cs = [c.double() for c in coeffs]
    w = importance(b, cs, second_moments, transpose)
    norms = b.norm(dim=0).clamp_min(1e-30)
    unit_b = b / norms
    cs = [c * norms[:, None] for c in cs]
    if method == "truncate":
        keep = w.argsort(descending=True)[:k].sort().values
        return unit_b[:, keep], [c[keep] for c in cs]
    rb = torch.randn(b.shape[0], proj_dim, generator=generator, dtype=torch.float64).to(b.device) / math.sqrt(proj_dim)
    pb = unit_b.T @ rb                                       # r x proj_dim
    sign = torch.sign(pb.gather(1, pb.abs().argmax(1, keepdim=True))).squeeze(1)
    sign[sign == 0] = 1
    unit_b, pb = unit_b * sign, pb * sign[:, None]
    cs = [c * sign[:, None] for c in cs]
    cat = torch.cat(cs, dim=1)                               # r x (n*s)
    rc = torch.randn(cat.shape[1], proj_dim, generator=generator, dtype=torch.float64).to(cat.device) / math.sqrt(proj_dim)
    pc = cat @ rc
    pc = pc / pc.norm(dim=1, keepdim=True).clamp_min(1e-30)
    labels = weighted_kmeans(torch.cat([pb, pc], dim=1), w, k, generator=generator)
    new_b = torch.zeros(b.shape[0], k, dtype=torch.float64, device=b.device).index_add_(1, labels, unit_b * w)
    new_b = new_b / new_b.norm(dim=0).clamp_min(1e-30)      # variance-aware rescaling back to unit templates
    new_c = [torch.zeros(k, c.shape[1], dtype=torch.float64, device=c.device).index_add_(0, labels, c) for c in cs]
    return new_b, new_c


def resolve_coefficients(basis: torch.Tensor, targets: list[torch.Tensor],
                         second_moments: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Stage 1b: ``C_i = pinv(B) @ M_i`` (least squares against the teacher's folded weights ``M_i``).

    With ``second_moments`` (an input-side basis, ``M_i = W_i^T``) the fit is weighted by the layer's
    inputs, ``min ||(W_i - C_i^T B^T) X_i^T||``: ``C_i = (B^T Sigma_i B)^-1 B^T Sigma_i M_i``. (For an
    output-side basis the plain projection is already optimal under any input weighting.)"""
    b = basis.double()
    if second_moments is None:
        pinv = torch.linalg.pinv(b)
        return [pinv @ t.double() for t in targets]
    out = []
    for t, sm in zip(targets, second_moments):
        sm = sm.double()
        sm = sm + GRAM_RIDGE * float(sm.diagonal().mean().clamp_min(1e-30)) * torch.eye(sm.shape[0], dtype=sm.dtype, device=sm.device)
        sb = sm @ b  # a ridge on Sigma, not on B^T Sigma B: a basis spanning W_i still reproduces it exactly
        out.append(torch.linalg.solve(b.T @ sb, sb.T @ t.double()))
    return out
