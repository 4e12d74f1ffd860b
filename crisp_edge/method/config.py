"""Configuration: what to convert and how. Frozen, validated, versioned, JSON round-trip.

    CrispConfig(default=RoleConfig(s=4, r=None, group_size=4),
                roles={"fc1": RoleConfig(s=8, r=16)})

``r=None`` means full capacity (``r = n*s`` for a group of ``n`` layers): the retrofit is exact.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from crisp_edge.errors import ConfigError
from crisp_edge.files.io import check_envelope, parse_json
from crisp_edge.method.gates import GATES, PLACEMENTS

CONFIG_FORMAT = "crisp-edge/config"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class RoleConfig:
    """CRISP settings for one role of linear layer (e.g. every ``mlp.fc1``).

    Attributes:
        s: mixer width; must divide ``d_in * d_out`` of the role's layers. Each layer's weight is a
            row-major reshape of a ``(d_in*d_out/s) x s`` matrix.
        r: rank of the shared basis (columns of B). ``None`` = full capacity ``n*s`` (exact retrofit);
            smaller values compress.
        group_size: how many consecutive blocks share one basis. ``None`` = all blocks in one group.
        gate: "silu" (the paper's sigmoid(A)*A), "gelu", "relu" or "none".
        placement: "pre" (W = B @ G(A), the paper's), "post" (G(B @ A)) or "temp" (G(B) @ A).
        transpose: reshape ``W.T`` instead of ``W`` (``W.T.reshape(u, s) = B @ G(A)``). With ``s = d_out``
            the shared basis spans the layers' *input* side, which is cheaper than the output side
            (``s = d_in``) when ``d_in + n*d_out < d_out + n*d_in`` (e.g. LLaMA's k/v/down projections).
    """

    s: int = 4
    r: int | None = None
    group_size: int | None = 4
    gate: str = "silu"
    placement: str = "pre"
    transpose: bool = False

    def __post_init__(self) -> None:
        _check_int("s", self.s, minimum=1)
        if not isinstance(self.transpose, bool):
            raise ConfigError(f"transpose must be True or False, got {self.transpose!r}.")
        if self.r is not None:
            _check_int("r", self.r, minimum=1, hint="use r=None for full capacity")
        if self.group_size is not None:
            _check_int("group_size", self.group_size, minimum=1, hint="use group_size=None for one group")
        if not isinstance(self.gate, str) or self.gate not in GATES:
            raise ConfigError(f"gate must be one of {sorted(GATES)}, got {self.gate!r}.")
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}.")

    def rank_for(self, n_layers: int, u: int) -> int:
        """The basis rank a group of ``n_layers`` gets (full capacity is ``min(u, n*s)``)."""
        return self.r if self.r is not None else min(u, n_layers * self.s)


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}." + (f" ({hint})" if hint else ""))


class _ReadOnlyDict(dict):
    """A dict that refuses edits (and still copies and pickles like a dict)."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("CrispConfig.roles is read-only; make a changed copy with CrispConfig.with_role(...).")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only  # type: ignore

    def __reduce__(self):
        return (_ReadOnlyDict, (dict(self),))


@dataclass(frozen=True)
class CrispConfig:
    """Which roles of an architecture become CRISP, and with what settings.

    Attributes:
        default: settings for every targeted role without an override.
        roles: per-role overrides, by role name (see ``crisp_edge.method.specs`` for each architecture's roles).
        targets: roles to convert; ``None`` = every role the architecture declares.
        gate_init_max: closed-form retrofit only: each rank component is scaled so the largest gated
            value is this, which keeps mixers small and where the gate is well sloped (see the README's
            design notes). Must lie in (0, 0.27) so SiLU can be inverted with margin; GELU (minimum
            -0.16997) needs less than 0.16997, which ``retrofit_`` checks before changing the model.
    """

    default: RoleConfig = field(default_factory=RoleConfig)
    roles: Mapping[str, RoleConfig] = field(default_factory=dict)
    targets: tuple[str, ...] | None = None
    gate_init_max: float = 0.15

    def __post_init__(self) -> None:
        if not isinstance(self.default, RoleConfig):
            raise ConfigError(f"default must be a RoleConfig, got {type(self.default).__name__}.")
        roles = dict(self.roles)
        for name, rc in roles.items():
            if not isinstance(rc, RoleConfig):
                raise ConfigError(f"roles[{name!r}] must be a RoleConfig, got {type(rc).__name__}.")
        object.__setattr__(self, "roles", _ReadOnlyDict(roles))  # frozen means frozen: no edits after validation
        if self.targets is not None:
            if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
                raise ConfigError(f"targets must be a sequence of role names, got {self.targets!r}.")
            object.__setattr__(self, "targets", tuple(self.targets))
            unknown = set(roles) - set(self.targets)
            if unknown:
                raise ConfigError(f"roles {sorted(unknown)} have overrides but are not in targets {self.targets}.")
        if not isinstance(self.gate_init_max, (int, float)) or not 0.0 < self.gate_init_max < 0.27:
            raise ConfigError(f"gate_init_max must lie in (0, 0.27), got {self.gate_init_max!r}.")

    def role(self, name: str) -> RoleConfig:
        return self.roles.get(name, self.default)

    def with_role(self, name: str, **changes: Any) -> CrispConfig:
        """A copy with ``name``'s settings changed (frozen configs are never mutated)."""
        return replace(self, roles={**self.roles, name: replace(self.role(name), **changes)})

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "default": _role_to_dict(self.default),
            "roles": {k: _role_to_dict(v) for k, v in sorted(self.roles.items())},
            "targets": list(self.targets) if self.targets is not None else None,
            "gate_init_max": self.gate_init_max,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CrispConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"a CRISP config must be a JSON object, got {type(d).__name__}.")
        check_envelope(d, fmt=CONFIG_FORMAT, max_version=CONFIG_VERSION, fields={}, error=ConfigError,
                       where="config", what="config")
        known = {f.name for f in fields(cls)} | {"format", "version"}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"unknown config keys {sorted(extra)}.")
        roles, targets = d.get("roles", {}), d.get("targets")
        if not isinstance(roles, Mapping):
            raise ConfigError(f"roles must be a JSON object mapping role names to role configs, got {roles!r:.80}.")
        if targets is not None and not isinstance(targets, (list, tuple)):
            raise ConfigError(f"targets must be a list of role names or null, got {targets!r:.80}.")
        return cls(
            default=_role_from_dict(d.get("default", {})),
            roles={k: _role_from_dict(v) for k, v in roles.items()},
            targets=tuple(targets) if targets is not None else None,
            gate_init_max=d.get("gate_init_max", 0.15),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CrispConfig:
        return cls.from_dict(parse_json(text, ConfigError, "config", "CRISP config"))


def _role_to_dict(rc: RoleConfig) -> dict[str, Any]:
    """A role's JSON; ``transpose`` only when set, so configs written before it existed stay identical."""
    d = asdict(rc)
    if not d["transpose"]:
        del d["transpose"]
    return d


def _role_from_dict(d: Any) -> RoleConfig:
    if not isinstance(d, Mapping):
        raise ConfigError(f"a role config must be a JSON object, got {d!r}.")
    known = {f.name for f in fields(RoleConfig)}
    extra = set(d) - known
    if extra:
        raise ConfigError(f"unknown role config keys {sorted(extra)}; known: {sorted(known)}.")
    return RoleConfig(**d)
