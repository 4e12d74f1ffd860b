"""What every compression method measures of a model the same way: the targeted linear layers, their
stored numbers (``stored_params``: dense, CRISP and every baseline counted alike, see
``crisp_edge.training.compress.baselines``), and calibration statistics of their inputs (Gram matrices,
whitening factors) for the data-aware methods."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from crisp_edge.errors import ConfigError
from crisp_edge.method.convert import _arch_of
from crisp_edge.method.layer import CrispLinear
from crisp_edge.method.specs import ArchSpec, resolve_blocks

#: Relative ridge added to a calibration Gram matrix before its Cholesky factorisation (dead input
#: channels make it singular); 1e-6 of the mean diagonal changes the whitened objective by < 1e-6.
GRAM_RIDGE = 1e-6


def targeted_linears(model: nn.Module, targets: Iterable[str] | None = None,
                     arch: str | ArchSpec | None = None) -> dict[str, tuple[str, nn.Module]]:
    """``{qualified name: (role, module)}`` of the layers the architecture table targets, block by block."""
    spec = _arch_of(model, arch)
    blocks = resolve_blocks(model, spec)
    roles = tuple(targets) if targets is not None else tuple(spec.roles)
    unknown = [r for r in roles if r not in spec.roles]
    if unknown:
        raise ConfigError(f"roles {unknown} are not roles of {spec.name}; its roles are {list(spec.roles)}.")
    out = {}
    for role in roles:
        for i in range(len(blocks)):
            name = f"{spec.blocks}.{i}.{spec.roles[role]}"
            try:
                out[name] = (role, model.get_submodule(name))
            except AttributeError:
                raise ConfigError(f"{type(model).__name__} has no layer {name!r} (role {role!r}).") from None
    return out


def stored_params(model: nn.Module, targets: Iterable[str] | None = None, arch: str | ArchSpec | None = None) -> int:
    """Stored numbers of the targeted linear weights (biases excluded), counted alike for every method:
    a dense ``nn.Linear`` counts ``d_out*d_in``; a CRISP layer its mixer plus its group's basis (once per
    group, so a full CRISP model gives ``crisp_edge.method.budget.budget(model).stored``); a baseline layer its
    factors, a shared basis once, a sparse factor by its kept entries."""
    counts: dict[str, int] = {}
    for name, (_, m) in targeted_linears(model, targets, arch).items():
        if isinstance(m, CrispLinear):
            counts[f"basis:{id(m.basis.weight)}"] = m.basis.weight.numel()
            counts[f"mixer:{id(m.crisp_mixer)}"] = m.crisp_mixer.numel()
        elif callable(getattr(m, "stored_counts", None)):  # a baseline layer counts its own factors
            counts.update(m.stored_counts())
        elif isinstance(m, nn.Linear):
            counts[f"dense:{id(m.weight)}"] = m.weight.numel()
        else:
            raise ConfigError(f"{name} is a {type(m).__name__}; stored_params counts nn.Linear, CrispLinear and "
                              "the baseline layers of crisp_edge.training.compress.baselines.")
    return sum(counts.values())


@dataclass
class LinearInputStats:
    """Second moments of the inputs each captured linear saw: ``gram[name] = X^T X`` (float64, summed
    over every token of every batch) and ``tokens[name]`` = the number of rows of ``X``."""

    gram: dict[str, torch.Tensor]
    tokens: dict[str, int]


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, batches: Iterable[Any], names: Iterable[str] | None = None, *,
                          targets: Iterable[str] | None = None, arch: str | ArchSpec | None = None,
                          progress: bool = False) -> LinearInputStats:
    """Run ``batches`` through ``model`` (eval mode, no grad) and accumulate, with forward hooks, the
    Gram matrix of the inputs of each targeted linear (or of ``names``). A batch is a tensor (passed
    positionally) or a mapping of keyword inputs. Only ``d_in x d_in`` sums are kept, never the
    activations, so memory does not grow with the number of batches."""
    layers = targeted_linears(model, targets, arch)
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in layers]
        if missing:
            raise ConfigError(f"cannot capture inputs of {missing}: not targeted linears of this model.")
        layers = {n: layers[n] for n in names}
    gram: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {n: 0 for n in layers}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            gram[name] = gram[name] + x.T @ x if name in gram else x.T @ x
            tokens[name] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, (_, m) in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in tqdm(batches, desc="calibration inputs", unit="batch", disable=not progress, leave=False):
            model(**batch) if isinstance(batch, Mapping) else model(batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0 or not gram:
        raise ConfigError("capture_linear_inputs got no batches (or no targeted layer ran); pass at least one batch.")
    return LinearInputStats(gram=gram, tokens=tokens)


def whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular ``S`` with ``S @ S.T = gram + ridge`` (float64): ``||E @ S||_F^2 = ||E @ X.T||_F^2``."""
    g = gram.double()
    ridge = GRAM_RIDGE * float(g.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(6):
        s, info = torch.linalg.cholesky_ex(g + ridge * eye)
        if int(info) == 0:
            return s
        ridge *= 100
    raise ConfigError("the calibration Gram matrix is not positive definite even with a ridge; the calibration "
                      "inputs are degenerate (all zero?): pass real calibration batches.")
