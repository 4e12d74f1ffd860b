"""Alg. 5's plan for a LLaMA model: which side each role's shared basis lives on (``choose_sides``), and
how a stored-parameter budget becomes ranks per role (``plan_ranks``: every role the same kept
fraction; ``greedy_ranks``: where a stored number removes the most relative error). See
``crisp_edge.training.compress.llama`` for the whole algorithm."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.method.config import CrispConfig, RoleConfig
from crisp_edge.method.convert import plan_groups
from crisp_edge.method.layer import fold_weight
from crisp_edge.method.specs import get_architecture
from crisp_edge.training.compress.basis_reduction import _side_gram
from crisp_edge.training.compress.linear_stats import (
    targeted_linears,
)

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
    sms = [moments[n].double() if moments else torch.eye(d_in, dtype=torch.float64, device=ms[0].device) for n in plan.layer_names]
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
        acc = out.setdefault(p.role, [torch.zeros(0, dtype=torch.float64, device=lam.device), 0.0])
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
