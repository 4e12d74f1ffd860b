"""Compression baselines at an exact stored-parameter budget, for any architecture in ``crisp_edge.method.specs``.

Three in-place verbs replace the targeted ``nn.Linear`` layers with small factorized, trainable modules
(so every method can get the same distillation data and steps as CRISP) and return a report:

* ``svd_(model, budget)``: per-layer truncated SVD, ``W ~ U @ V`` (``U: d_out x k``, ``V: k x d_in``).
* ``basis_sharing_(model, budget, calib_inputs=...)``: Basis Sharing (Wang et al., ICLR 2025): the
  layers of one role in a group of ``group_size`` consecutive blocks share an input-side basis
  ``V`` (``k x d_in``), each keeps its own ``U_i`` (``d_out x k``); the factors come from the SVD of
  the stacked weights times ``S``, the Cholesky factor of the group's calibration input Gram matrix
  ``X^T X = S S^T`` (so the truncation minimises the output error ``||(W - W') X^T||``), then ``S``
  is undone (``V = Sigma^1/2 V_k^T S^-1``).
* ``fips_(model, budget)`` (in ``fips.py``): FiPS-style (Uyuk et al., TMLR 2026): a group shares a dense basis on the
  smaller side of its weights; each layer keeps a *sparse* projection. SVD init, magnitude pruning to
  the budget, then a short masked refinement of the (whitened, with calibration data) reconstruction.

``stored_params(model)`` counts the stored numbers of the targeted linear weights the same way for a
dense model, a CRISP model (``u*r + n*r*s`` per group, as ``crisp_edge.method.budget``) and every baseline:
a shared tensor counts once, biases never count (every method keeps them unchanged), and a sparse
projection counts its kept entries (nnz; its index storage is not counted, as in the FiPS paper).

Budgets are integers. Granularity: FiPS hits the budget exactly (it chooses nnz). The SVD methods
store whole rank components, so they hit the largest count <= budget their units allow: after the
ranks are allocated (the same kept fraction for every layer or group, then the leftover handed out
greedily to the components with the largest next singular value per stored number), the shortfall
``budget - stored`` is smaller than the cost of one more component of every layer/group that is not
already at full rank. ``BaselineReport.shortfall`` and ``.max_unit`` record it; tests assert it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from crisp_edge.errors import ConfigError
from crisp_edge.method.convert import _set_submodule
from crisp_edge.method.specs import ArchSpec
from crisp_edge.training.compress.linear_stats import (
    LinearInputStats,
    stored_params,
    targeted_linears,
    whitening_factor,
)

#: Model-level ``nn.ModuleDict`` holding the bases shared by baseline layers (each stored once).
BASELINE_BASES_NAME = "baseline_bases"
METHODS = ("svd", "basis_sharing", "fips")


# --------------------------------------------------------------------------------------------------
# factorized layers
# --------------------------------------------------------------------------------------------------
class SharedBasis(nn.Module):
    """A dense basis shared by the layers of one group (registered once, at model level)."""

    def __init__(self, key: str, weight: torch.Tensor, layer_names: list[str]) -> None:
        super().__init__()
        self.key, self.layer_names = key, list(layer_names)
        self.weight = nn.Parameter(weight.clone())

    def extra_repr(self) -> str:
        return f"key={self.key}, shape={tuple(self.weight.shape)}, layers={len(self.layer_names)}"


class LowRankLinear(nn.Module):
    """``y = x @ (U @ V).T + b`` with ``U: d_out x k`` and ``V: k x d_in``; either factor may be a
    ``SharedBasis`` of the group (held by reference, like ``CrispLinear``'s basis), and the per-layer
    factor may be sparse (a fixed 0/1 ``mask`` buffer; only kept entries count as stored)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, *,
                 shared: str | None = None, basis: SharedBasis | None = None,
                 mask: torch.Tensor | None = None) -> None:
        super().__init__()
        if shared not in (None, "in", "out"):
            raise ConfigError(f"shared must be None, 'in' or 'out', got {shared!r}.")
        self.shared = shared
        object.__setattr__(self, "_basis", basis)
        if shared != "out":
            self.u = nn.Parameter(u.clone())
        if shared != "in":
            self.v = nn.Parameter(v.clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        if mask is not None:
            self.register_buffer("mask", mask.to(dtype=(u if shared != "out" else v).dtype).clone())
        else:
            self.mask = None
        self.out_features = (basis.weight if shared == "out" else u).shape[0]
        self.in_features = (basis.weight if shared == "in" else v).shape[1]
        self.rank = (basis.weight.shape[1] if shared == "out" else u.shape[1])

    @property
    def basis(self) -> SharedBasis | None:
        return self._basis

    def _own(self) -> torch.Tensor:
        own = self.v if self.shared == "out" else self.u
        return own * self.mask if self.mask is not None else own

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` with any mask applied and the shared basis in its place."""
        if self.shared == "in":
            return self._own(), self._basis.weight
        if self.shared == "out":
            return self._basis.weight, self._own()
        return (self.u * self.mask if self.mask is not None else self.u), self.v

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` weight this layer computes with."""
        u, v = self.factors()
        return u @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors()
        return F.linear(F.linear(x, v), u, self.bias)

    def stored_counts(self) -> dict[str, int]:
        """Stored weight numbers by tensor identity (a shared basis has one key for the whole group)."""
        counts = {}
        if self.shared is not None:
            counts[f"basis:{id(self._basis.weight)}"] = self._basis.weight.numel()
        for name in ("u", "v"):
            p = getattr(self, name, None)
            if isinstance(p, nn.Parameter):
                n = int(self.mask.count_nonzero()) if self.mask is not None and p is (
                    self.v if self.shared == "out" else self.u) else p.numel()
                counts[f"{name}:{id(p)}"] = n
        return counts

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"shared={self.shared}, sparse={self.mask is not None}, bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------------
# reports and rank allocation
# --------------------------------------------------------------------------------------------------
@dataclass
class BaselineReport:
    """What a baseline did: the budget asked, what it stores, per-layer errors, time."""

    method: str
    budget: int
    stored: int
    original: int
    max_unit: int            # SVD methods: the largest one-component cost; FiPS: 1 (one nnz)
    groups: list[dict]
    layer_errors: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def shortfall(self) -> int:
        return self.budget - self.stored

    @property
    def kept_fraction(self) -> float:
        return self.stored / self.original

    @property
    def max_error(self) -> float:
        return max(self.layer_errors.values(), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(shortfall=self.shortfall, kept_fraction=self.kept_fraction, max_rel_error=self.max_error)
        return d

    def format(self) -> str:
        return (f"{self.method}: budget {self.budget:,} -> stored {self.stored:,} (shortfall {self.shortfall:,}; "
                f"kept {100 * self.kept_fraction:.1f}% of {self.original:,}), worst layer error {self.max_error:.3f}, "
                f"{self.seconds:.1f} s")


@dataclass
class _Holder:
    """One unit of rank allocation: a layer (SVD) or a group (Basis Sharing)."""

    key: str
    unit: int                 # stored numbers per rank component
    max_rank: int
    dense: int                # dense numbers it replaces
    energy: torch.Tensor      # squared singular values, descending (the gain of each next component)
    rank: int = 0


def _allocate(holders: list[_Holder], budget: int, method: str) -> int:
    """Ranks for every holder: the same kept fraction everywhere (floored), then the leftover to the
    next components with the largest (normalised) energy per stored number until none fits."""
    capacity = sum(h.unit * h.max_rank for h in holders)
    if budget > capacity:
        raise ConfigError(f"{method}: budget {budget:,} exceeds the most this method can store ({capacity:,}, every "
                          "layer at full rank); ask for less, or keep the layers dense.")
    smallest = min(h.unit for h in holders)
    if budget < smallest:
        raise ConfigError(f"{method}: budget {budget:,} is below the cost of a single rank component ({smallest:,}).")
    frac = budget / sum(h.dense for h in holders)
    for h in holders:
        h.rank = max(0, min(h.max_rank, math.floor(frac * h.dense / h.unit)))
    left = budget - sum(h.unit * h.rank for h in holders)
    total = {h.key: float(h.energy.sum()) or 1.0 for h in holders}
    while True:
        fits = [h for h in holders if h.rank < h.max_rank and h.unit <= left]
        if not fits:
            break
        best = max(fits, key=lambda h: float(h.energy[h.rank]) / total[h.key] / h.unit)
        best.rank += 1
        left -= best.unit
    return left


def _check_budget(budget: Any) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget must be a positive integer count of stored weight numbers, got {budget!r}; "
                          "e.g. int(0.7 * stored_params(model)) for a 30% reduction.")
    return budget


def _check_group_size(group_size: Any) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ConfigError(f"group_size must be a positive integer or None (all blocks in one group), got {group_size!r}.")


def _plain_layers(model: nn.Module, targets, arch) -> dict[str, tuple[str, nn.Linear]]:
    layers = targeted_linears(model, targets, arch)
    for name, (_, m) in layers.items():
        if type(m) is not nn.Linear:
            raise ConfigError(f"{name} is a {type(m).__name__}, not a plain nn.Linear; baselines start from the dense "
                              "model (materialize_ a CRISP model first, or use a fresh copy).")
        if not torch.isfinite(m.weight).all():
            raise ConfigError(f"{name}.weight contains NaN or Inf; fix the model's weights first.")
    return layers


def _groups(layers: dict[str, tuple[str, nn.Linear]], group_size: int | None) -> list[tuple[str, list[str]]]:
    """Consecutive same-role layers in groups of ``group_size`` (keys ``<role>_<first>_<last>``)."""
    by_role: dict[str, list[str]] = {}
    for name, (role, _) in layers.items():
        by_role.setdefault(role, []).append(name)
    out = []
    for role, names in by_role.items():
        size = group_size or len(names)
        for start in range(0, len(names), size):
            group = names[start:start + size]
            shapes = {tuple(layers[n][1].weight.shape) for n in group}
            if len(shapes) > 1:
                raise ConfigError(f"role {role!r} layers {group} have different shapes {sorted(shapes)}; layers "
                                  "sharing a basis need one shape: use group_size=1.")
            out.append((f"{role}_{start}_{start + len(group) - 1}", group))
    return out


def _gram_for(calib: LinearInputStats | None, names: list[str], d_in: int) -> torch.Tensor | None:
    if calib is None:
        return None
    missing = [n for n in names if n not in calib.gram]
    if missing:
        raise ConfigError(f"calibration statistics have no inputs for {missing[:3]}...; capture them with "
                          "capture_linear_inputs(model, batches) on this model before replacing its layers.")
    g = sum(calib.gram[n] for n in names)
    if g.shape != (d_in, d_in):
        raise ConfigError(f"calibration Gram for {names[0]} is {tuple(g.shape)}, expected {(d_in, d_in)}.")
    return g


def _svd(stack: torch.Tensor, s: torch.Tensor | None):
    """SVD of ``stack @ S`` (float64): ``(U, sigma, Vh @ S^-1)``."""
    m = stack.double()
    if s is not None:
        m = m @ s
    u, sig, vh = torch.linalg.svd(m, full_matrices=False)
    if s is not None:  # undo the whitening: rows of Vh S^-1 solve X S = Vh  <=>  S^T X^T = Vh^T
        vh = torch.linalg.solve_triangular(s.T, vh.T, upper=True).T
    return u, sig, vh


def _rel_error(approx: torch.Tensor, target: torch.Tensor) -> float:
    t = target.detach().double()
    return float((approx.detach().double() - t).norm() / t.norm().clamp_min(1e-300))


def _register_basis(model: nn.Module, basis: SharedBasis) -> None:
    bases = getattr(model, BASELINE_BASES_NAME, None)
    if not isinstance(bases, nn.ModuleDict):
        bases = nn.ModuleDict()
        model.add_module(BASELINE_BASES_NAME, bases)
    if basis.key in bases:
        raise ConfigError(f"model already has a baseline basis {basis.key!r}; start from a fresh dense model.")
    bases[basis.key] = basis


# --------------------------------------------------------------------------------------------------
# the three methods
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def svd_(model: nn.Module, budget: int, *, targets: Iterable[str] | None = None, arch: str | ArchSpec | None = None,
         calib_inputs: LinearInputStats | None = None, progress: bool = True) -> BaselineReport:
    """Per-layer truncated SVD at ``budget`` stored numbers, in place. With ``calib_inputs`` the SVD is
    whitened by each layer's own input statistics (SVD-LLM style); without, it is the plain
    Eckart-Young truncation. Returns a ``BaselineReport``."""
    budget = _check_budget(budget)
    start = time.perf_counter()
    layers = _plain_layers(model, targets, arch)
    original = sum(m.weight.numel() for _, m in layers.values())
    facts, holders = {}, []
    for name, (_, m) in tqdm(layers.items(), desc="svd", unit="layer", disable=not progress, leave=False):
        d_out, d_in = m.weight.shape
        g = _gram_for(calib_inputs, [name], d_in)
        facts[name] = _svd(m.weight, whitening_factor(g) if g is not None else None)
        holders.append(_Holder(name, d_out + d_in, min(d_out, d_in), d_out * d_in, facts[name][1] ** 2))
    _allocate(holders, budget, "svd_")
    errors, groups = {}, []
    for h in holders:
        m = layers[h.key][1]
        u, sig, vh = facts[h.key]
        root = sig[:h.rank].sqrt()
        new = LowRankLinear((u[:, :h.rank] * root).to(m.weight.dtype), (root[:, None] * vh[:h.rank]).to(m.weight.dtype),
                            m.bias)
        errors[h.key] = _rel_error(new.weight, m.weight)
        groups.append({"key": h.key, "layers": [h.key], "rank": h.rank, "max_rank": h.max_rank, "unit": h.unit})
        _set_submodule(model, h.key, new)
    return BaselineReport("svd", budget, stored_params(model, targets, arch), original, max(h.unit for h in holders),
                          groups, errors, time.perf_counter() - start,
                          ["whitened by calibration inputs" if calib_inputs is not None else "plain (data-free)"])


@torch.no_grad()
def basis_sharing_(model: nn.Module, budget: int, *, calib_inputs: LinearInputStats | None, group_size: int | None = 2,
                   targets: Iterable[str] | None = None, arch: str | ArchSpec | None = None,
                   progress: bool = True) -> BaselineReport:
    """Basis Sharing at ``budget`` stored numbers, in place: per role, groups of ``group_size``
    consecutive layers share an input-side basis ``V`` (``k x d_in``); layer ``i`` keeps ``U_i``.

    ``calib_inputs`` (from ``capture_linear_inputs`` on the dense model) gives the paper's whitening:
    ``S`` = Cholesky factor of the summed input Gram of the group's layers, SVD of
    ``[W_1; ...; W_n] @ S``, then ``V = Sigma^1/2 Vh_k S^-1``, ``U_i = (U_k Sigma^1/2)[rows of i]``.
    Pass ``calib_inputs=None`` explicitly for the data-free (unwhitened) variant.
    """
    budget = _check_budget(budget)
    _check_group_size(group_size)
    start = time.perf_counter()
    layers = _plain_layers(model, targets, arch)
    original = sum(m.weight.numel() for _, m in layers.values())
    plan = _groups(layers, group_size)
    facts, holders = {}, []
    for key, names in tqdm(plan, desc="basis sharing", unit="group", disable=not progress, leave=False):
        d_out, d_in = layers[names[0]][1].weight.shape
        g = _gram_for(calib_inputs, names, d_in)
        stack = torch.cat([layers[n][1].weight.detach() for n in names], dim=0)  # n*d_out x d_in
        facts[key] = _svd(stack, whitening_factor(g) if g is not None else None)
        holders.append(_Holder(key, d_in + len(names) * d_out, min(d_in, len(names) * d_out),
                               len(names) * d_out * d_in, facts[key][1] ** 2))
    _allocate(holders, budget, "basis_sharing_")
    errors, groups = {}, []
    for h, (key, names) in zip(holders, plan):
        ref = layers[names[0]][1].weight
        d_out = ref.shape[0]
        u, sig, vh = facts[key]
        root = sig[:h.rank].sqrt()
        us = u[:, :h.rank] * root
        basis = SharedBasis(key, (root[:, None] * vh[:h.rank]).to(ref.dtype), names)
        _register_basis(model, basis)
        for i, name in enumerate(names):
            m = layers[name][1]
            new = LowRankLinear(us[i * d_out:(i + 1) * d_out].to(ref.dtype), None, m.bias, shared="in", basis=basis)
            errors[name] = _rel_error(new.weight, m.weight)
            _set_submodule(model, name, new)
        groups.append({"key": key, "layers": names, "rank": h.rank, "max_rank": h.max_rank, "unit": h.unit})
    return BaselineReport("basis_sharing", budget, stored_params(model, targets, arch), original,
                          max(h.unit for h in holders), groups, errors, time.perf_counter() - start,
                          ["whitened by calibration inputs" if calib_inputs is not None else "unwhitened (data-free)"])
