"""Parameter budget -> basis ranks for a compressed CRISP student.

A budget is the kept fraction of the *targeted* dense linear weights (``keep_fraction=0.5`` = a
50% reduction). A CRISP group of ``n`` layers stores ``u*r + n*r*s`` numbers (``crisp_edge.method.budget``),
so every rank of a group costs ``u + n*s``. Two allocators, both exact (the plan's ``stored`` is what
``budget(student).stored`` will count) and both never above the budget:

* ``"uniform"``: every role keeps (as nearly as integer ranks allow) the same fraction of its
  weights; the leftover budget goes one rank at a time to the role furthest below its share.
* ``"greedy"``: start every role at rank 1, then repeatedly give one more rank to the role whose
  next rank buys the largest drop in reconstruction error per stored parameter (the JACTUS idea).
  The error of a role at rank r is the sum over its layers of the relative error of the best rank-r
  fit of the group (for full ranks above ``MAX_GRID`` greedy moves in steps of several ranks) (Eckart-Young on the stacked reshaped weights): measured on the layer outputs
  ``||X (W_r - W)^T||^2 / ||X W^T||^2`` when calibration inputs are given, else on the weights.

Ranks are chosen **per role** (all groups of a role get one rank), because the CRISP config, and so
the checkpoint format, records one rank per role: a student with these ranks saves, loads, adapts
and exports like any CRISP model.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.method.config import CrispConfig
from crisp_edge.method.convert import crisp_bases, crisp_layers, is_crisp, plan_groups
from crisp_edge.method.layer import fold_weight, unfold_weight
from crisp_edge.training.compress.linear_stats import LinearInputStats
from crisp_edge.training.compress.whitened import whitened_factors
from crisp_edge.training.evaluate import model_logits
from crisp_edge.training.retrofit import best_rank_factors

METHODS = ("uniform", "greedy")


@dataclass(frozen=True)
class GroupInfo:
    """What the allocator needs to know about one group."""

    key: str
    role: str
    layer_names: tuple[str, ...]
    u: int
    s: int
    full_rank: int
    transpose: bool = False

    @property
    def n(self) -> int:
        return len(self.layer_names)

    @property
    def cost_per_rank(self) -> int:
        return self.u + self.n * self.s

    @property
    def original(self) -> int:
        return self.n * self.u * self.s


@dataclass
class RankPlan:
    """Per-role (and per-group) ranks that fit a parameter budget, with the exact accounting."""

    method: str
    keep_fraction: float
    original: int            # dense weights of the targeted layers
    target: int              # floor(keep_fraction * original): the most that may be stored
    stored: int              # what the student stores with these ranks (<= target)
    role_ranks: dict[str, int]
    group_ranks: dict[str, int]
    full_ranks: dict[str, int]
    errors: dict[str, float] = field(default_factory=dict)  # per role, at its chosen rank (greedy only)

    @property
    def kept_fraction(self) -> float:
        return self.stored / self.original

    def config(self, base: CrispConfig) -> CrispConfig:
        """``base`` with every role's rank set to this plan's."""
        cfg = base
        for role, r in self.role_ranks.items():
            cfg = cfg.with_role(role, r=r)
        return cfg

    def to_dict(self) -> dict:
        return {"method": self.method, "keep_fraction": self.keep_fraction, "original": self.original,
                "target": self.target, "stored": self.stored, "kept_fraction": self.kept_fraction,
                "role_ranks": dict(self.role_ranks), "group_ranks": dict(self.group_ranks),
                "full_ranks": dict(self.full_ranks), "errors": dict(self.errors)}


def group_infos(model: nn.Module, config: CrispConfig | None = None) -> list[GroupInfo]:
    """The groups of a CRISP model, or the groups ``config`` would make of a plain one."""
    if is_crisp(model):
        return [GroupInfo(k, b.role, tuple(b.layer_names), b.u, b.s, b.full_rank, b.transpose) for k, b in crisp_bases(model).items()]
    _, plans = plan_groups(model, config or CrispConfig())
    return [GroupInfo(p.key, p.role, p.layer_names, p.u, p.s, p.full_rank, p.transpose) for p in plans]


def allocate_ranks(model: nn.Module, keep_fraction: float, method: str = "uniform", *,
                   calib: torch.Tensor | None = None, calib_mask: torch.Tensor | None = None,
                   config: CrispConfig | None = None, init: str = "svd") -> RankPlan:
    """Turn ``keep_fraction`` of the targeted dense weights into per-role ranks.

    Args:
        model: the CRISP teacher (or a plain model plus ``config``, which says how it would be grouped).
        keep_fraction: in (0, 1]; the stored CRISP numbers will be at most ``floor(keep_fraction * original)``.
        method: "uniform" or "greedy" (see the module docstring).
        calib: model inputs (e.g. a few dozen images) for the greedy allocator's output-error measure;
            without them it measures the error on the weights.
        calib_mask: beside token-id ``calib``, its attention mask (1 = token, 0 = padding): the model
            sees it, and padded positions are left out of the measure.
        init: the student init the ranks are for (``init_student``): greedy measures the error of that
            init's rank-r factors: "svd" the plain SVD's (truncated at every rank at once), "svd-whitened"
            the whitened factors' (needs ``calib``; computed only at the ranks greedy reaches, on a grid of
            about ``WHITENED_GRID`` ranks per role, with ``ALLOC_ALS_STEPS`` alternating steps).

    Raises:
        ConfigError: unknown method, a fraction outside (0, 1], or a budget below rank 1 everywhere.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}.")
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)) or not 0 < keep_fraction <= 1:
        raise ConfigError(f"keep_fraction must be in (0, 1] (0.5 = keep half the targeted weights), got {keep_fraction!r}.")
    groups = group_infos(model, config)
    if not groups:
        raise ConfigError("the model has no groups to compress; pass a CRISP model or a plain one with a config.")
    roles: dict[str, list[GroupInfo]] = {}
    for g in groups:
        roles.setdefault(g.role, []).append(g)
    cost = {r: sum(g.cost_per_rank for g in gs) for r, gs in roles.items()}
    full = {r: min(g.full_rank for g in gs) for r, gs in roles.items()}
    original = sum(g.original for g in groups)
    target = int(keep_fraction * original)
    minimum = sum(cost.values())
    if target < minimum:
        raise ConfigError(
            f"keep_fraction={keep_fraction} allows {target:,} stored numbers, but rank 1 in every group already "
            f"needs {minimum:,} ({minimum / original:.2%} of {original:,}); use keep_fraction >= "
            f"{minimum / original:.4f}.")
    errors: dict[str, list[float]] = {}
    if method == "uniform":
        ranks = {r: max(1, min(full[r], int(keep_fraction * sum(g.original for g in gs) / cost[r])))
                 for r, gs in roles.items()}
        while sum(ranks[r] * cost[r] for r in roles) > target:  # only when rank 1 was forced somewhere
            r = max((r for r in roles if ranks[r] > 1), key=lambda r: ranks[r] / full[r])
            ranks[r] -= 1
        left = target - sum(ranks[r] * cost[r] for r in roles)
        while True:  # fill: one rank to the role furthest below the common fraction, while it fits
            fits = [r for r in roles if ranks[r] < full[r] and cost[r] <= left]
            if not fits:
                break
            r = min(fits, key=lambda r: (ranks[r] / full[r], list(roles).index(r)))
            ranks[r] += 1
            left -= cost[r]
    else:
        grids = {r: _rank_grid(full[r], WHITENED_GRID if init == "svd-whitened" else MAX_GRID) for r in roles}
        if init == "svd-whitened":
            if calib is None:
                raise ConfigError("greedy ranks for the whitened init need calib (the calibration inputs).")
            errors = _whitened_errors(model, roles, calib, calib_mask)
        else:
            errors = _role_errors(model, roles, grids, calib, calib_mask)
        ranks = {r: 1 for r in roles}
        left = target - minimum
        while True:  # move one role to its next rank on the grid: the best error drop per stored number
            steps = {r: grids[r][grids[r].index(ranks[r]) + 1] for r in roles if ranks[r] < full[r]}
            fits = [r for r in steps if (steps[r] - ranks[r]) * cost[r] <= left]
            if not fits:
                break
            r = max(fits, key=lambda r: (errors[r][ranks[r]] - errors[r][steps[r]]) / ((steps[r] - ranks[r]) * cost[r]))
            left -= (steps[r] - ranks[r]) * cost[r]
            ranks[r] = steps[r]
    stored = sum(ranks[r] * cost[r] for r in roles)
    assert stored <= target
    return RankPlan(method=method, keep_fraction=float(keep_fraction), original=original, target=target,
                    stored=stored, role_ranks=ranks, group_ranks={g.key: ranks[g.role] for g in groups},
                    full_ranks=full, errors={r: errors[r][ranks[r]] for r in errors})


#: Most ranks per role the greedy allocator evaluates: beyond it (large s, so full ranks in the
#: hundreds) it moves in steps of ``ceil(full / MAX_GRID)`` ranks, keeping the cost bounded.
MAX_GRID = 64


def _rank_grid(full: int, points: int = MAX_GRID) -> list[int]:
    """The ranks greedy may stop at: 1, then every ``step``-th rank (about ``points`` of them), and full."""
    step = -(-full // points)
    return sorted({1, full, *range(step, full, step)})


@torch.no_grad()
def _role_errors(model: nn.Module, roles: dict[str, list[GroupInfo]], grids: dict[str, list[int]],
                 calib: torch.Tensor | None, calib_mask: torch.Tensor | None = None) -> dict[str, dict[int, float]]:
    """``errors[role][r]`` for r on the role's grid: summed relative error of the role's layers at rank r."""
    weights = _layer_weights(model, roles)
    inputs = layer_input_stats(model, weights, calib, calib_mask).gram if calib is not None else {}
    out: dict[str, list[float]] = {}
    for role, gs in roles.items():
        errs = dict.fromkeys(grids[role], 0.0)
        for g in gs:
            stacked = torch.cat([fold_weight(weights[n].double(), g.u, g.s, g.transpose) for n in g.layer_names], dim=1)
            p, q = best_rank_factors(stacked, g.full_rank)
            for rank in grids[role]:
                approx = p[:, :rank] @ q[:rank]
                for i, name in enumerate(g.layer_names):
                    w = weights[name].double()
                    diff = unfold_weight(approx[:, i * g.s:(i + 1) * g.s], *w.shape, g.transpose) - w
                    errs[rank] += _relative_error(diff, w, inputs.get(name))
        out[role] = errs
    return out


def _relative_error(diff: torch.Tensor, w: torch.Tensor, gram: torch.Tensor | None) -> float:
    """``||X D^T||^2 / ||X W^T||^2`` (``= tr(D G D^T) / tr(W G W^T)`` with ``G = X^T X``), or on the weights."""
    if gram is None:
        return float(diff.square().sum() / w.square().sum().clamp_min(1e-300))
    return float(((diff @ gram) * diff).sum() / ((w @ gram) * w).sum().clamp_min(1e-300))


#: Alternating steps of the whitened factors the greedy allocator measures (the init itself takes up to
#: ``whitened.ALS_STEPS``): most of the drop from the plain SVD comes in the first few.
ALLOC_ALS_STEPS = 8
#: Most ranks per role greedy evaluates for the whitened init (each is an alternating solve).
WHITENED_GRID = 8


class _WhitenedCurve(dict):
    """One role's ``{rank: summed relative output error of the whitened rank-r factors}``, computed on first use."""

    def __init__(self, groups: list[GroupInfo], weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor]):
        super().__init__()
        self.groups, self.weights, self.grams = groups, weights, grams

    def __missing__(self, rank: int) -> float:
        total = 0.0
        for g in self.groups:
            if rank >= g.full_rank:  # exact
                continue
            ws = [self.weights[n].double() for n in g.layer_names]
            p, q = whitened_factors(ws, [self.grams[n] for n in g.layer_names], g.s, g.transpose, rank,
                                    steps=ALLOC_ALS_STEPS)
            for i, (name, w) in enumerate(zip(g.layer_names, ws)):
                diff = unfold_weight(p @ q[:, i * g.s:(i + 1) * g.s], *w.shape, g.transpose) - w
                total += _relative_error(diff, w, self.grams[name])
        self[rank] = total
        return total


@torch.no_grad()
def _whitened_errors(model: nn.Module, roles: dict[str, list[GroupInfo]], calib: torch.Tensor,
                     calib_mask: torch.Tensor | None) -> dict[str, _WhitenedCurve]:
    weights = _layer_weights(model, roles)
    grams = layer_input_stats(model, weights, calib, calib_mask).gram
    return {role: _WhitenedCurve(gs, weights, grams) for role, gs in roles.items()}


def _layer_weights(model: nn.Module, roles: dict[str, list[GroupInfo]]) -> dict[str, torch.Tensor]:
    layers = crisp_layers(model) if is_crisp(model) else {}
    return {n: (layers[n].weight if n in layers else model.get_submodule(n).weight).detach()
            for gs in roles.values() for g in gs for n in g.layer_names}


@torch.no_grad()
def layer_input_stats(model: nn.Module, names: Iterable[str], calib: torch.Tensor,
                      calib_mask: torch.Tensor | None = None) -> LinearInputStats:
    """The Gram matrix ``X^T X`` (float64) of the inputs each layer of ``names`` sees on model inputs
    ``calib`` in one forward pass (with ``calib_mask``: over real tokens only, the padded positions' rows
    dropped), as ``capture_linear_inputs`` records them."""
    seen: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    hooks = []
    keep = None if calib_mask is None else calib_mask.reshape(-1).bool()
    for name in names:
        def hook(_m, args, _out, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if keep is not None and len(x) == len(keep):  # one row per token: drop the padding's
                x = x[keep]
            seen[name], tokens[name] = x.T @ x, x.shape[0]
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model_logits(model, calib, calib_mask)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return LinearInputStats(gram=seen, tokens=tokens)
