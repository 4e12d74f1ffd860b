"""The FiPS-style baseline (Uyuk et al., TMLR 2026): a group of layers shares a dense basis on the
smaller side of its weights; each layer keeps a *sparse* projection. SVD init, magnitude pruning to the
budget, then a short masked refinement of the (whitened, with calibration data) reconstruction. Counted,
reported and distilled like the other baselines (``crisp_edge.training.compress.baselines``)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from crisp_edge.errors import ConfigError
from crisp_edge.method.convert import _set_submodule
from crisp_edge.method.specs import ArchSpec
from crisp_edge.training.compress.baselines import (
    BaselineReport,
    LowRankLinear,
    SharedBasis,
    _check_budget,
    _check_group_size,
    _gram_for,
    _groups,
    _plain_layers,
    _register_basis,
    _rel_error,
    _svd,
)
from crisp_edge.training.compress.linear_stats import (
    LinearInputStats,
    stored_params,
    whitening_factor,
)


def fips_(model: nn.Module, budget: int, *, group_size: int | None = 2, basis_fraction: float = 0.5,
          calib_inputs: LinearInputStats | None = None, refine_steps: int = 100, lr: float = 1e-3,
          targets: Iterable[str] | None = None, arch: str | ArchSpec | None = None,
          progress: bool = True) -> BaselineReport:
    """FiPS-style compression at exactly ``budget`` stored numbers, in place.

    Per role, groups of ``group_size`` consecutive layers share a dense basis on the weights' smaller
    side (``d = min(d_out, d_in)``, the model width for MLPs, as FiPS does); each layer keeps a sparse
    projection on the other side. About ``basis_fraction`` of each group's share of the budget goes to
    the basis (rank ``k <= d``), the rest to nonzeros: init by SVD of the stacked weights, keep the
    largest entries (scaled by their basis column's norm) up to the nnz, then ``refine_steps`` of Adam
    on the reconstruction error with the mask fixed (whitened by the group's input Gram when
    ``calib_inputs`` is given, FiPS's output reconstruction; plain weight error otherwise).
    """
    budget = _check_budget(budget)
    _check_group_size(group_size)
    if not isinstance(basis_fraction, (int, float)) or not 0 < basis_fraction < 1:
        raise ConfigError(f"basis_fraction must lie in (0, 1), got {basis_fraction!r}.")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ConfigError(f"refine_steps must be a non-negative integer, got {refine_steps!r}.")
    start = time.perf_counter()
    layers = _plain_layers(model, targets, arch)
    original = sum(m.weight.numel() for _, m in layers.values())
    plan = _groups(layers, group_size)
    frac = budget / original
    specs = []  # (key, names, side, d_shared, d_other, rank, dense)
    for key, names in plan:
        d_out, d_in = layers[names[0]][1].weight.shape
        side = "out" if d_out <= d_in else "in"
        d_sh, d_oth = (d_out, d_in) if side == "out" else (d_in, d_out)
        dense = len(names) * d_out * d_in
        k = max(1, min(d_sh, math.floor(basis_fraction * frac * dense / d_sh)))
        specs.append((key, names, side, d_sh, d_oth, k, dense))
    basis_cost = sum(k * d_sh for _, _, _, d_sh, _, k, _ in specs)
    caps = [len(names) * k * d_oth for _, names, _, _, d_oth, k, _ in specs]
    nnz_total = budget - basis_cost
    if nnz_total < len(specs) or nnz_total > sum(caps):
        lo, hi = basis_cost + len(specs), basis_cost + sum(caps)
        raise ConfigError(f"fips_: with basis_fraction={basis_fraction} the budget must lie in [{lo:,}, {hi:,}] "
                          f"(got {budget:,}); change basis_fraction or the budget.")
    nnz = _split(nnz_total, [dense for *_, dense in specs], caps)
    errors, groups = {}, []
    bar = tqdm(list(zip(specs, nnz)), desc="fips", unit="group", disable=not progress, leave=False)
    for (key, names, side, d_sh, d_oth, k, _), keep in bar:
        ws = [layers[n][1].weight.detach() for n in names]
        ref = ws[0]
        # side "in": W_i = P_i (d_out x k) @ Basis (k x d_in); side "out": W_i^T = P_i^T @ Basis^T
        stack = torch.cat([w if side == "in" else w.T for w in ws], dim=0)  # n*d_oth x d_sh
        u, sig, vh = _svd(stack, None)
        root = sig[:k].sqrt()
        p, b = u[:, :k] * root, root[:, None] * vh[:k]                      # n*d_oth x k, k x d_sh
        score = p.abs() * b.norm(dim=1)[None, :]
        flat = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        flat[score.reshape(-1).topk(keep).indices] = 1.0
        mask, p = flat.reshape(p.shape), p.contiguous()
        g = _gram_for(calib_inputs, names, ref.shape[1])
        b, p = _refine(ws, b, p, mask, side, whitening_factor(g) if g is not None else None, refine_steps, lr)
        basis = SharedBasis(key, (b if side == "in" else b.T).to(ref.dtype), names)
        _register_basis(model, basis)
        for i, name in enumerate(names):
            m = layers[name][1]
            pi, mi = p[i * d_oth:(i + 1) * d_oth].to(ref.dtype), mask[i * d_oth:(i + 1) * d_oth]
            new = (LowRankLinear(pi, None, m.bias, shared="in", basis=basis, mask=mi) if side == "in" else
                   LowRankLinear(None, pi.T, m.bias, shared="out", basis=basis, mask=mi.T))
            errors[name] = _rel_error(new.weight, m.weight)
            _set_submodule(model, name, new)
        groups.append({"key": key, "layers": names, "rank": k, "shared_side": side, "nnz": keep,
                       "density": keep / (len(names) * k * d_oth)})
    return BaselineReport("fips", budget, stored_params(model, targets, arch), original, 1, groups, errors,
                          time.perf_counter() - start,
                          [f"basis_fraction={basis_fraction}, refine_steps={refine_steps}, "
                           + ("whitened refinement" if calib_inputs is not None else "weight-space refinement")])


def _split(total: int, weights: list[int], caps: list[int]) -> list[int]:
    """Integers proportional to ``weights``, each within ``[1, cap]``, summing to ``total`` exactly."""
    out = [max(1, min(c, math.floor(total * w / sum(weights)))) for w, c in zip(weights, caps)]
    left = total - sum(out)
    while left:
        step = 1 if left > 0 else -1
        movable = [i for i in range(len(out)) if (out[i] < caps[i] if step > 0 else out[i] > 1)]
        for i in movable:
            room = caps[i] - out[i] if step > 0 else out[i] - 1
            d = step * min(room, abs(left))
            out[i] += d
            left -= d
            if not left:
                break
    return out


def _refine(ws, b, p, mask, side, s, steps, lr):
    """Masked Adam on the relative (optionally whitened) reconstruction error; keeps the best factors."""
    if steps == 0:
        return b, p * mask
    n, d_oth = len(ws), p.shape[0] // len(ws)
    targets = [(w if side == "in" else w.T).double() for w in ws]  # each d_oth x d_sh (side in: d_out x d_in)
    b, p = b.clone().requires_grad_(True), (p * mask).clone().requires_grad_(True)
    opt = torch.optim.Adam([b, p], lr=lr * float(b.detach().abs().mean() + p.detach().abs().mean()))

    def loss_fn():
        total = 0.0
        for i, t in enumerate(targets):
            e = (p[i * d_oth:(i + 1) * d_oth] * mask[i * d_oth:(i + 1) * d_oth]) @ b - t
            if s is not None:  # whitening acts on d_in: columns for side "in", rows for side "out"
                e, t = (e @ s, t @ s) if side == "in" else (s.T @ e, s.T @ t)
            total = total + e.pow(2).sum() / t.pow(2).sum()
        return total / n

    best, best_state = float("inf"), None
    with torch.enable_grad():
        for _ in range(steps + 1):
            opt.zero_grad()
            loss = loss_fn()
            if float(loss.detach()) < best:
                best, best_state = float(loss.detach()), (b.detach().clone(), p.detach().clone())
            loss.backward()
            opt.step()
    b, p = best_state
    return b, p * mask
