"""CRISP compression of LLaMA-style causal LMs (the paper's Alg. 5), in place.

    report = compress_llama_(model, budget, calib_batches=batches)   # dense LlamaForCausalLM -> CRISP

Pipeline (per role p and group g; ``u x r`` basis ``B``, per-layer ``r x s`` mixers ``A_i``,
gated coefficients ``C_i = G(A_i)``, so ``W_i.reshape(u, s) = B @ C_i = sum_j b_j c_ij^T``):

0. **Layout** at full capacity under ``llama_crisp_config`` (data-free: the closed-form, exact
   ``crisp_edge.retrofit_``; with calibration inputs only ``convert_``'s layout, because Stage 1 then
   derives every group's factors from the teacher's weights), each role's basis on one side (``choose_sides`` picks, per role, the side
   whose leading components keep more output variance at the rank the budget buys there):
   ``s = d_in`` (``u = d_out``: a shared *output* basis; DESIGN.md section 2 measured wide s as the
   best data-free fit, while small s fits poorly without training) or ``s = d_out`` transposed
   (``u = d_in``: a shared *input* basis, Basis Sharing's structure). Groups of ``group_size``
   consecutive blocks (default 2).
   With calibration inputs, each group's full-capacity factors are its principal directions
   (``principal_basis``: exact at full capacity, from the teacher's weights): of the output covariance
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

from crisp_edge.errors import ConfigError
from crisp_edge.method.convert import _set_submodule, convert_, crisp_bases
from crisp_edge.method.gates import get_gate
from crisp_edge.method.layer import CrispBasis, CrispLinear
from crisp_edge.method.specs import get_architecture
from crisp_edge.training.compress.basis_reduction import (
    REDUCTIONS,
    principal_basis,
    reduce_basis,
    resolve_coefficients,
)
from crisp_edge.training.compress.linear_stats import (
    LinearInputStats,
    capture_linear_inputs,
    stored_params,
    targeted_linears,
)
from crisp_edge.training.compress.llama_ranks import (
    ALLOCATIONS,
    SIDES,
    choose_sides,
    greedy_ranks,
    llama_crisp_config,
    plan_ranks,
)
from crisp_edge.training.retrofit import retrofit_


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
    layout = llama_crisp_config(model, group_size, gate_init_max=gate_init_max, sides=chosen)
    if moments_all is None:  # data-free: Stage 1 reduces the closed-form retrofit's factors
        retrofit_(model, layout, arch="hf-llama", progress=progress)
        errors = {"retrofit": _mean_rel_error(model, teacher)}
    else:  # Stage 1 derives each group's factors from the teacher (principal_basis): a retrofit's would be discarded
        convert_(model, layout, "hf-llama", generator=torch.Generator().manual_seed(seed))
        errors = {}
    times["retrofit"] = time.perf_counter() - t
    gen = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    solved, stage1 = {}, []
    for key, basis in tqdm(list(crisp_bases(model).items()), desc=f"alg5 stage 1 ({reduction})", unit="group",
                           disable=not progress, leave=False):
        moments = [moments_all[n] for n in basis.layer_names] if moments_all is not None else None
        targets = [basis.to_folded(teacher[n]) for n in basis.layer_names]
        tr = basis.transpose
        if moments is not None:
            b, coeffs = principal_basis(targets, moments, basis.r, transpose=tr)
        else:
            gate = get_gate(basis.gate_name)
            b = basis.weight.detach()
            coeffs = [gate.fn(model.get_submodule(n).crisp_mixer.detach().double()) for n in basis.layer_names]
        b, cs = reduce_basis(b, coeffs, ranks[basis.role], method=reduction, second_moments=moments, transpose=tr,
                             generator=gen)
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
