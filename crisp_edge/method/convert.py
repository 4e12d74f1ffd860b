"""Structural conversion: plain ``nn.Linear`` layers <-> CRISP layers, in place.

``convert_`` swaps the targeted linears for ``CrispLinear`` with freshly initialised factors (the
paper's random init; ``retrofit_`` then fits them to the original weights). ``materialize_`` folds
every CRISP layer back into a plain ``nn.Linear``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.method.config import CrispConfig
from crisp_edge.method.layer import BASES_NAME, CrispBasis, CrispLinear
from crisp_edge.method.specs import (
    ArchSpec,
    detect_architecture,
    get_architecture,
    resolve_blocks,
)

#: The paper's Alg. 2 initialises B and A from N(0, 0.01); read as variance 0.01 (std 0.1), which
#: gives weights of the usual magnitude for transformer linears.
RANDOM_INIT_STD = 0.1


@dataclass(frozen=True)
class GroupPlan:
    """One group of same-role layers that will share a basis."""

    key: str
    role: str
    layer_names: tuple[str, ...]
    d_in: int
    d_out: int
    s: int
    r: int
    gate: str
    placement: str
    transpose: bool = False

    @property
    def u(self) -> int:
        return self.d_in * self.d_out // self.s

    @property
    def full_rank(self) -> int:
        return min(self.u, len(self.layer_names) * self.s)


def _arch_of(model: nn.Module, arch: str | ArchSpec | None) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch
    if isinstance(arch, str):
        return get_architecture(arch)
    recorded = getattr(model, "crisp_arch", None)
    return get_architecture(recorded) if recorded else detect_architecture(model)


def check_capacity(plans: list[GroupPlan]) -> list[str]:
    """Check each role's rank against the basis height ``u``: a basis of rank r > u is impossible to use
    (its u x r matrix has rank <= u) and r = 10^9 would try to allocate it, so that is a ConfigError.
    Returns a note for each role whose r is above full capacity ``n*s`` of its largest group: allowed
    (the paper's gradient descent may use it), but the basis is exact at ``n*s`` already, so a larger
    one stores more numbers for no better fit."""
    notes, seen = [], set()
    for p in plans:
        u, full = p.d_in * p.d_out // p.s, len(p.layer_names) * p.s
        if p.r > u:
            raise ConfigError(f"r={p.r} for role {p.role!r} is above the basis height u={u} (d_in*d_out/s), so no "
                              f"basis of that rank exists; use r <= {min(u, full)} (full capacity), or leave r unset.")
        biggest = max(len(q.layer_names) for q in plans if q.role == p.role) * p.s
        if p.r > biggest and p.role not in seen:
            seen.add(p.role)
            notes.append(f"note: r={p.r} for role {p.role!r} is above its full capacity {min(u, biggest)} (n*s), where "
                         "the basis is already exact; the extra rank stores more numbers for no better fit.")
    return notes


def plan_groups(model: nn.Module, config: CrispConfig, arch: str | ArchSpec | None = None) -> tuple[ArchSpec, list[GroupPlan]]:
    """Decide the groups for ``model`` under ``config`` and check every layer fits; changes nothing."""
    spec = _arch_of(model, arch)
    blocks = resolve_blocks(model, spec)
    targets = config.targets if config.targets is not None else tuple(spec.roles)
    unknown = [t for t in targets if t not in spec.roles] + sorted(set(config.roles) - set(spec.roles) - set(targets))
    if unknown:
        raise ConfigError(f"roles {unknown} are not roles of {spec.name}; its roles are {list(spec.roles)}.")
    plans = []
    for role in targets:
        rc = config.role(role)
        names = [f"{spec.blocks}.{i}.{spec.roles[role]}" for i in range(len(blocks))]
        layers = []
        for name in names:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"{type(model).__name__} has no layer {name!r} (role {role!r} of {spec.name}).") from None
            if isinstance(layer, CrispLinear):
                raise ConfigError(f"{name} is already a CRISP layer; materialize_(model) first to convert it again.")
            if not isinstance(layer, nn.Linear):
                raise ConfigError(f"{name} is a {type(layer).__name__}, not nn.Linear; cannot convert role {role!r}.")
            layers.append(layer)
        size = rc.group_size or len(names)
        for start in range(0, len(names), size):
            group = list(zip(names, layers))[start:start + size]
            d_out, d_in = group[0][1].weight.shape
            for name, layer in group:
                if tuple(layer.weight.shape) != (d_out, d_in):
                    raise ConfigError(
                        f"{name} is {tuple(layer.weight.shape)} but {group[0][0]} is {(d_out, d_in)}; layers sharing "
                        f"a basis must have one shape: use group_size=1 for role {role!r}."
                    )
            if (d_in * d_out) % rc.s:
                divisors = [k for k in range(1, 65) if (d_in * d_out) % k == 0]
                raise ConfigError(
                    f"s={rc.s} does not divide d_in*d_out={d_in}*{d_out}={d_in * d_out} for role {role!r}; "
                    f"choose s from its divisors, e.g. {divisors[-8:]}."
                )
            u = d_in * d_out // rc.s
            end = start + len(group) - 1
            plans.append(GroupPlan(
                key=f"{role}_{start}_{end}", role=role, layer_names=tuple(n for n, _ in group),
                d_in=d_in, d_out=d_out, s=rc.s, r=rc.rank_for(len(group), u), gate=rc.gate, placement=rc.placement,
                transpose=rc.transpose,
            ))
    return spec, plans


def convert_(model: nn.Module, config: CrispConfig | None = None, arch: str | ArchSpec | None = None,
             generator: torch.Generator | None = None) -> nn.Module:
    """Replace the targeted linears of ``model`` by CRISP layers, in place, with random factors.

    Biases are copied from the original layers. Use ``retrofit_`` to also fit the factors to the
    original weights. Returns ``model``.
    """
    config = config or CrispConfig()
    spec, plans = plan_groups(model, config, arch)
    bases = nn.ModuleDict()
    for plan in plans:
        first = model.get_submodule(plan.layer_names[0])
        ref = first.weight
        basis = CrispBasis(plan.role, list(plan.layer_names), plan.d_in, plan.d_out, plan.s, plan.r,
                           plan.gate, plan.placement, dtype=ref.dtype, device=ref.device, transpose=plan.transpose)
        with torch.no_grad():
            basis.weight.copy_(torch.randn(basis.weight.shape, generator=generator) * RANDOM_INIT_STD)
        bases[plan.key] = basis
        for name in plan.layer_names:
            old = model.get_submodule(name)
            new = CrispLinear(basis, bias=old.bias is not None)
            with torch.no_grad():
                new.crisp_mixer.copy_(torch.randn(new.crisp_mixer.shape, generator=generator) * RANDOM_INIT_STD)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            _set_submodule(model, name, new)
    model.add_module(BASES_NAME, bases)
    model.crisp_config = config
    model.crisp_arch = spec.name
    if hasattr(model, "save_pretrained"):  # a Hugging Face model: its own savers would lose the CRISP layers
        for method in _HF_SAVERS:
            model.__dict__[method] = _refuse_hf_save
    return model


#: Hugging Face methods that write a model in transformers' format. A CRISP model's tensors
#: (crisp_bases.*, *.crisp_mixer) have names transformers does not know: ``from_pretrained`` would
#: re-initialise every converted linear at random, with only a log line. They are refused instead.
_HF_SAVERS = ("save_pretrained", "push_to_hub")


def _refuse_hf_save(*_args, **_kwargs):
    from crisp_edge.errors import CheckpointError

    raise CheckpointError(
        "this is a CRISP model: save_pretrained / push_to_hub would write tensors that from_pretrained cannot "
        "read (it would re-initialise every converted linear at random). Save it with "
        "crisp_edge.save_checkpoint(model, path) and load it with crisp_edge.load_checkpoint(path); or, for a "
        "plain Hugging Face model, fold the CRISP layers into dense linears first with crisp_edge.materialize_(model) "
        "and then call save_pretrained.")


def materialize_(model: nn.Module) -> nn.Module:
    """Fold every CRISP layer into a plain ``nn.Linear`` (weight = its current W), in place."""
    layers = crisp_layers(model)
    if not layers:
        raise ConfigError("model has no CRISP layers to materialize.")
    dense = {}
    for name, layer in layers.items():
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        dtype=layer.crisp_mixer.dtype, device=layer.crisp_mixer.device)
        with torch.no_grad():
            lin.weight.copy_(layer.weight)
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        lin.train(layer.training)
        dense[name] = lin
    return restore_(model, dense)


def restore_(model: nn.Module, originals: dict[str, nn.Module]) -> nn.Module:
    """Undo ``convert_``: put the original modules back (by name) and drop the bases."""
    for name, module in originals.items():
        _set_submodule(model, name, module)
    if hasattr(model, BASES_NAME):
        delattr(model, BASES_NAME)
    for attr in ("crisp_config", "crisp_arch", *_HF_SAVERS):
        model.__dict__.pop(attr, None)
    return model


def crisp_layers(model: nn.Module) -> dict[str, CrispLinear]:
    """Every CRISP layer of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CrispLinear)}


def crisp_bases(model: nn.Module) -> dict[str, CrispBasis]:
    """Every shared basis of ``model`` by group key."""
    bases = getattr(model, BASES_NAME, None)
    return dict(bases.items()) if isinstance(bases, nn.ModuleDict) else {}


def group_layout(model: nn.Module) -> dict[str, dict]:
    """The group layout of a CRISP model: for each group its role, layers and factor shapes."""
    return {
        key: {"role": b.role, "layers": list(b.layer_names), "d_in": b.d_in, "d_out": b.d_out,
              "s": b.s, "r": b.r, "gate": b.gate_name, "placement": b.placement}
        | ({"transpose": True} if b.transpose else {})  # only when set: older checkpoints' layouts stay equal
        for key, b in crisp_bases(model).items()
    }


def is_crisp(model: nn.Module) -> bool:
    return bool(crisp_bases(model))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
