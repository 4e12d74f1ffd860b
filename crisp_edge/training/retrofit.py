"""Retrofit (neural mimicry, Alg. 2): fit CRISP factors to a pretrained model's weights.

Two methods, one entry point, ``retrofit_``:

* ``"svd"`` (default, closed form): per group, stack the layers' reshaped weights side by side
  (``M = [W_1.reshape(u, s), ..., W_n.reshape(u, s)]``, ``u x n*s``; ``W_i.T`` for a transposed group)
  and take the best rank-r
  factorisation ``M ~ P @ Q`` (exact when ``r >= n*s``; Eckart-Young optimal below). Each rank
  component j is rescaled (``B`` absorbs ``1/alpha_j``) so that its largest coefficient is
  ``config.gate_init_max``: mixers stay small, where the gate is well sloped, and the gate's
  minimum (-0.2785 for SiLU) is never approached. Then ``A = G^-1(alpha * Q)`` on the gate's
  increasing branch. Optionally refined by ``refine_steps`` of smooth-L1 descent.
* ``"gradient"``: the paper's Alg. 2 as written: random init, smooth-L1 gradient descent.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from crisp_edge.errors import CheckpointError, ConfigError, RetrofitError
from crisp_edge.files.run_state import (
    RUN_STATE_FILE,
    check_checkpointing,
    load_run_state,
    optimizer_tensors,
    restore_copy_,
    restore_optimizer_,
    save_run_state,
)
from crisp_edge.method.budget import Budget, budget
from crisp_edge.method.config import CrispConfig
from crisp_edge.method.convert import GroupPlan, check_capacity, convert_, crisp_bases, plan_groups
from crisp_edge.method.gates import crisp_weight_matrix, get_gate
from crisp_edge.method.layer import CrispBasis
from crisp_edge.method.specs import ArchSpec

METHODS = ("svd", "gradient")


@dataclass(frozen=True)
class LayerFit:
    name: str
    role: str
    group: str
    rel_error: float  # ||W_crisp - W||_F / ||W||_F


@dataclass
class RetrofitReport:
    """What a retrofit did: per-layer relative reconstruction errors and the parameter budget."""

    method: str
    layers: list[LayerFit]
    budget: Budget
    seconds: float
    refine_steps: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((l.rel_error for l in self.layers), default=0.0)

    def group_errors(self) -> dict[str, float]:
        """Worst relative error per group."""
        out: dict[str, float] = {}
        for l in self.layers:
            out[l.group] = max(out.get(l.group, 0.0), l.rel_error)
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "refine_steps": self.refine_steps, "seconds": self.seconds,
                "max_rel_error": self.max_error, "layers": [asdict(l) for l in self.layers],
                "budget": self.budget.to_dict(), "notes": list(self.notes)}

    def format(self) -> str:
        """A terminal table: one row per group, then the totals."""
        from crisp_edge.report import format_budget

        return format_budget(self.budget, self.group_errors()) + (
            f"\nretrofit: method={self.method}"
            + (f" + {self.refine_steps} refine steps" if self.refine_steps else "")
            + f", {self.seconds:.2f} s, worst layer error {self.max_error:.2e}"
        )


def retrofit_(model: nn.Module, config: CrispConfig | None = None, *, arch: str | ArchSpec | None = None,
              method: str = "svd", refine_steps: int = 0, steps: int = 2000, lr: float | None = None,
              progress: bool = True, seed: int = 0, checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int | None = None, resume: bool = False) -> RetrofitReport:
    """Convert ``model`` to CRISP form in place and fit the factors to its current weights.

    Args:
        model: a plain model of a registered architecture (see ``crisp_edge.method.specs``).
        config: what to convert; defaults to ``CrispConfig()`` (s=4, groups of 4 blocks, full rank).
        method: "svd" (closed form, fast, exact at full rank) or "gradient" (Alg. 2 from random init).
        refine_steps: with "svd", smooth-L1 descent steps after the closed form (0 = none).
        steps: with "gradient", the number of descent steps per group.
        lr: Adam learning rate for descent (default 1e-2 for "gradient", 1e-4 for refinement).
        progress: show a progress bar per group.
        seed: seeds the random init and the padding of over-complete bases.
        checkpoint_dir: for the descent ("gradient", or "svd" with ``refine_steps``): keep the run's
            state (every factor, the current group's Adam state, position, RNG) in
            ``checkpoint_dir/run_state.safetensors``, written atomically after every group and every
            ``checkpoint_every`` descent steps.
        resume: continue from that state if there is one: the same model (its original weights are
            fingerprinted), config and settings give the same factors as an uninterrupted run, bit for bit.

    Returns:
        A ``RetrofitReport`` with per-layer relative errors and the parameter budget.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}.")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ConfigError(f"refine_steps must be a non-negative integer, got {refine_steps!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}.")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 10):
        raise ConfigError(f"lr must be in (0, 10) or None for the method's default, got {lr!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    check_checkpointing(checkpoint_dir, checkpoint_every, resume)
    config = config or CrispConfig()
    _, plans = plan_groups(model, config, arch)  # validates before anything changes
    check_capacity(plans)
    if method == "svd":
        for plan in plans:
            _check_closed_form(plan, config.gate_init_max)
    originals = {n: model.get_submodule(n).weight.detach() for p in plans for n in p.layer_names}
    for name, w in originals.items():
        if not torch.isfinite(w).all():
            raise RetrofitError(f"{name}.weight contains NaN or Inf; fix the model's weights before retrofitting.")
    descends = method == "gradient" or refine_steps > 0
    if not descends:
        checkpoint_dir = None  # the closed form takes seconds: nothing worth resuming
    fingerprint = None if checkpoint_dir is None else {
        "method": method, "config": config.to_dict(), "refine_steps": refine_steps, "steps": steps, "lr": lr,
        "seed": seed, "groups": [p.key for p in plans],
        "weights_sha256": _weights_digest(originals)}
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    convert_(model, config, arch, generator=gen)
    bases = crisp_bases(model)
    mixers_of = {p.key: [model.get_submodule(n).crisp_mixer for n in p.layer_names] for p in plans}
    factors = {f"basis.{k}": b.weight for k, b in bases.items()} | {
        f"mixer.{n}": m for p in plans for n, m in zip(p.layer_names, mixers_of[p.key])}
    first, saved, seconds_before = 0, None, 0.0
    if resume and (loaded := load_run_state(checkpoint_dir, "retrofit", fingerprint)) is not None:
        first, saved, seconds_before = _restore_factors_(loaded, factors, gen)
        step, limit = saved[1].get("step"), refine_steps if method == "svd" else steps
        if not (0 <= first <= len(plans) and isinstance(step, int) and 0 <= step < limit
                and (step == 0 or first < len(plans))):
            raise CheckpointError(f"the saved retrofit state in {RUN_STATE_FILE} is inconsistent (group {first}, step "
                                  f"{step!r}); delete it to start over.")

    def save(group: int, step: int = 0, opt=None, best_loss: float = float("inf"), best=None) -> None:
        tensors, optim_meta = optimizer_tensors(opt) if opt is not None else ({}, None)
        tensors |= factors | {"rng": gen.get_state()} | {f"best.{i}": b for i, b in enumerate(best or [])}
        save_run_state(checkpoint_dir, "retrofit", fingerprint, tensors, {
            "group": group, "step": step, "optimizer": optim_meta, "best_loss": best_loss,
            "seconds": seconds_before + time.perf_counter() - start})

    bar = tqdm(plans, desc=f"retrofit ({method})", unit="group", disable=not progress, leave=False, initial=first)
    for gi, plan in enumerate(plans):
        if gi < first:
            continue
        bar.set_postfix_str(plan.key)
        basis, mixers = bases[plan.key], mixers_of[plan.key]
        targets = [originals[n] for n in plan.layer_names]
        partial = saved if gi == first and saved is not None and saved[1]["step"] > 0 else None
        on_step = None if checkpoint_dir is None or not checkpoint_every else (
            lambda step, opt, best_loss, best, gi=gi: save(gi, step, opt, best_loss, best), checkpoint_every)
        if method == "svd":
            if partial is None:
                _closed_form_(basis, mixers, targets, config.gate_init_max, gen)
            if refine_steps:
                _descend_(basis, mixers, targets, refine_steps, lr or 1e-4, keep_best=True, resume_from=partial,
                          on_step=on_step)
        else:
            _descend_(basis, mixers, targets, steps, lr or 1e-2, resume_from=partial, on_step=on_step)
        if checkpoint_dir is not None:
            save(gi + 1)
        bar.update()
    bar.close()
    seconds = seconds_before + time.perf_counter() - start
    layers = [
        LayerFit(n, p.role, p.key, relative_error(model.get_submodule(n).weight, originals[n]))
        for p in plans for n in p.layer_names
    ]
    return RetrofitReport(method, layers, budget(model), seconds, refine_steps if method == "svd" else 0)


def _weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the original weights: a run resumes only on the model it started from."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode() + b"\0")
        h.update(weights[name].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@torch.no_grad()
def _restore_factors_(loaded, factors: dict[str, torch.Tensor], gen: torch.Generator):
    """Copy a saved retrofit state into the model's factors; returns (group, (tensors, state), seconds)."""
    tensors, state = loaded
    try:
        for name, t in factors.items():
            restore_copy_(t, tensors.get(name), name)
        gen.set_state(tensors["rng"])
        return int(state["group"]), loaded, float(state["seconds"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the saved retrofit state in {RUN_STATE_FILE} is incomplete or damaged "
                              f"({type(e).__name__}: {e}); delete it to start over.") from None


def relative_error(approx: torch.Tensor, target: torch.Tensor) -> float:
    """``||approx - target||_F / ||target||_F`` in float64."""
    t = target.detach().double()
    return float((approx.detach().double() - t).norm() / t.norm().clamp_min(1e-300))


def _check_closed_form(plan: GroupPlan, gate_init_max: float) -> None:
    gate = get_gate(plan.gate)
    if not gate.invertible:
        raise RetrofitError(
            f"role {plan.role!r}: the closed-form retrofit needs an invertible gate, and {plan.gate!r} is not; "
            "use method='gradient' (Alg. 2) for it."
        )
    if plan.placement == "post" and plan.gate != "none":
        raise RetrofitError(
            f"role {plan.role!r}: placement 'post' (W = G(B @ A)) cannot represent weights below the gate's minimum, "
            "so it has no exact closed form; use method='gradient' (Alg. 2) for it."
        )
    if gate_init_max >= -gate.min_value:  # coefficients reach -gate_init_max: below the gate's minimum
        raise ConfigError(
            f"role {plan.role!r}: gate_init_max={gate_init_max} reaches below gate {plan.gate!r}'s minimum "
            f"({gate.min_value:.5g}), so the closed form cannot invert it; use gate_init_max < {-gate.min_value:.5g}."
        )


def best_rank_factors(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``P (u x k), Q (k x n)`` with ``P @ Q`` the best rank-k approximation of ``m`` (float64).

    Eigen-decomposes the Gram matrix of the smaller side, so a tall ``u x n*s`` stack costs
    ``O(u (n s)^2)``. Components come out by decreasing singular value; at full rank the product
    reproduces ``m`` exactly (an orthogonal projection onto the whole row or column space).
    """
    m = m.double()
    if m.shape[1] <= m.shape[0]:
        _, v = torch.linalg.eigh(m.T @ m)
        v = v.flip(-1)[:, :k]
        return m @ v, v.T
    _, u = torch.linalg.eigh(m @ m.T)
    u = u.flip(-1)[:, :k]
    return u, u.T @ m


@torch.no_grad()
def _closed_form_(basis: CrispBasis, mixers: list[nn.Parameter], targets: list[torch.Tensor],
                  gate_init_max: float, gen: torch.Generator) -> None:
    stacked = torch.cat([basis.to_folded(t.double()) for t in targets], dim=1)  # u x (n*s)
    p, q = best_rank_factors(stacked, min(basis.r, basis.full_rank))
    write_factors_(basis, mixers, p, q, gate_init_max, gen)


@torch.no_grad()
def write_factors_(basis: CrispBasis, mixers: list[nn.Parameter], p: torch.Tensor, q: torch.Tensor,
                   gate_init_max: float, gen: torch.Generator) -> None:
    """Set a group's basis and mixers so that ``B @ G(A_i)`` (or ``G(B) @ A_i``) equals the product of
    ``p`` (``u x k``, ``k <= r``) and ``q`` (``k x n*s``, layer i's coefficients in columns ``i*s..``):
    each component rescaled so its largest coefficient is ``gate_init_max`` (the module docstring's
    rescaling), the gate inverted, and any ``r - k`` extra columns random with zero coefficients."""
    u, s, r = basis.u, basis.s, basis.r
    k = p.shape[1]
    gate = get_gate(basis.gate_name)
    if basis.placement in ("pre", "post"):  # gate on the coefficients (post only with gate "none")
        scale = gate_init_max / q.abs().amax(dim=1).clamp_min(1e-300)
        b, coeff = p / scale, gate.inverse(q * scale[:, None])
    else:  # "temp": the gate acts on the basis, W = G(B) @ A
        scale = gate_init_max / p.abs().amax(dim=0).clamp_min(1e-300)
        b, coeff = gate.inverse(p * scale), q / scale[:, None]
    if k < r:  # over-complete basis: random extra columns with zero coefficients (exact, yet trainable)
        extra_b = torch.randn(u, r - k, generator=gen, dtype=torch.float64) * b.std().clamp_min(1e-12)
        extra_a = gate.inverse(torch.zeros(r - k, coeff.shape[1], dtype=torch.float64)) if basis.placement != "temp" \
            else torch.zeros(r - k, coeff.shape[1], dtype=torch.float64)
        b, coeff = torch.cat([b, extra_b], 1), torch.cat([coeff, extra_a], 0)
    basis.weight.copy_(b)
    for i, mixer in enumerate(mixers):
        mixer.copy_(coeff[:, i * s:(i + 1) * s])


def _descend_(basis: CrispBasis, mixers: list[nn.Parameter], targets: list[torch.Tensor], steps: int, lr: float,
              keep_best: bool = False, resume_from=None, on_step=None) -> None:
    """Smooth-L1 mimicry (Alg. 2, line 8-9) of one group, with the loss measured in units of the
    weights' standard deviation so one learning rate fits every layer size.

    With ``keep_best`` (refinement) the factors with the lowest loss seen are kept, so refining an
    already exact closed form cannot make it worse (Adam's first steps move every entry by ~lr).
    ``on_step = (callback, every)`` calls ``callback(step, opt, best_loss, best)`` after every
    ``every`` steps; ``resume_from`` (a run state it saved) continues from that step."""
    gate = get_gate(basis.gate_name)
    tgt = [basis.to_folded(t).to(basis.weight.dtype) for t in targets]
    scale = torch.cat([t.flatten() for t in tgt]).std().clamp_min(1e-12)
    params = [basis.weight, *mixers]
    opt = torch.optim.Adam(params, lr=lr)
    best_loss, best, first = float("inf"), None, 0
    if resume_from is not None:  # the factors themselves were restored with the rest of the model
        tensors, state = resume_from
        try:
            restore_optimizer_(opt, tensors, state["optimizer"])
            first, best_loss = int(state["step"]), float(state["best_loss"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the saved retrofit state in {RUN_STATE_FILE} is incomplete ({type(e).__name__}: "
                                  f"{e}); delete it to start over.") from None
        if "best.0" in tensors:
            best = [torch.empty_like(p) for p in params]
            for i, b in enumerate(best):
                restore_copy_(b, tensors.get(f"best.{i}"), f"best factor {i}")
    with torch.enable_grad():
        for step in range(first, steps + 1):
            loss = sum(
                F.smooth_l1_loss(crisp_weight_matrix(basis.weight, a, gate, basis.placement) / scale, t / scale)
                for a, t in zip(mixers, tgt)
            )
            if keep_best and loss.item() < best_loss:
                best_loss, best = loss.item(), [p.detach().clone() for p in params]
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None and (step + 1) % on_step[1] == 0 and step + 1 < steps:
                on_step[0](step + 1, opt, best_loss, best)
    if best is not None:
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    for p in params:
        p.grad = None
